#!/usr/bin/env python3
"""Generated tokens/s of the embedded model, at concurrency 1 and 4 (and 8).

Two jobs: the quick-start job (jobs/quickstart.toml, its input repeated to ROWS rows: prompt-heavy,
short answers), and a generation-bound one (a one-line prompt, 64 tokens generated, no stop).
Runs the release binary (default features) and reports the completion tokens over the run's wall
time (model load excluded: the summary's clock starts when the first row is read). Needs
`promptmill fetch-model` done once.
"""
import argparse, json, os, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--repeat", type=int, default=2, help="runs per concurrency; the best is kept")
    a = ap.parse_args()
    work = os.path.join(ROOT, "bench", "work")
    os.makedirs(work, exist_ok=True)
    src = [json.loads(l) for l in open(os.path.join(ROOT, "jobs", "data", "articles.jsonl")) if l.strip()]
    inp = os.path.join(work, "local_articles.jsonl")
    with open(inp, "w") as f:
        for i in range(a.rows):
            r = dict(src[i % len(src)])
            r["id"] = f"{r['id']}-{i + 1}"
            f.write(json.dumps(r) + "\n")
    gen_in = os.path.join(work, "local_gen.csv")
    with open(gen_in, "w") as f:
        f.write("t\n" + "".join(f"a dog called Rex number {i}\n" for i in range(a.rows)))
    gen_job = os.path.join(work, "local_gen.toml")
    with open(gen_job, "w") as f:
        f.write('[input]\npath = "local_gen.csv"\n[[messages]]\nrole = "user"\n'
                'content = "Write a story about {{ t }}."\n[model]\nprovider = "local"\n'
                'temperature = 0.0\nmax_tokens = 64\n[output]\npath = "local_gen.jsonl"\n')
    exe = os.path.join(ROOT, "target", "release", "promptmill")
    table = []
    for name, job, extra in [("quick-start job", "jobs/quickstart.toml", ["--input", inp]),
                             ("generation-bound job", os.path.relpath(gen_job, ROOT), [])]:
        print(f"== {name}")
        for c, tps, s in bench(exe, job, extra, work, a):
            table.append((name, c, tps, s))
    print("\n| job | concurrency | generated tokens/s | rows/s |\n| --- | --- | --- | --- |")
    for name, c, tps, s in table:
        print(f"| {name} | {c} | {tps:.1f} | {s['rows_per_s']:.2f} |")


def bench(exe, job, extra, work, a):
    rows = []
    for c in [int(x) for x in a.concurrency.split(",")]:
        best = None
        for _ in range(a.repeat):
            out = os.path.join(work, f"local_c{c}.jsonl")
            cmd = [exe, "--quiet", "run", job, "--fresh", *extra, "--output", out,
                   "--concurrency", str(c)]
            t = time.time()
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            total = time.time() - t
            if p.returncode != 0:
                sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
            s = json.load(open(out + ".summary.json"))
            tps = s["completion_tokens"] / s["wall_time_s"]
            if best is None or tps > best[0]:
                best = (tps, s, total, cmd)
        tps, s, total, cmd = best
        print(f"concurrency {c}: {s['completion_tokens']} tokens in {s['wall_time_s']:.2f} s = "
              f"{tps:.1f} generated tokens/s ({s['rows_ok']} rows, {s['rows_per_s']:.2f} rows/s; "
              f"{total:.1f} s with model load)\n  command: {' '.join(os.path.relpath(x, ROOT) if x.startswith(ROOT) else x for x in cmd)}")
        rows.append((c, tps, s))
    return rows

if __name__ == "__main__":
    main()
