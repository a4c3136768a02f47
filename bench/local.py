#!/usr/bin/env python3
"""Generated tokens/s of the embedded model on the quick-start job, at concurrency 1 and 4.

Runs the release binary (default features) on jobs/quickstart.toml with its input repeated to
ROWS rows, and reports the completion tokens over the run's wall time (model load excluded: the
summary's clock starts when the first row is read). Needs `promptmill fetch-model` done once.
"""
import argparse, json, os, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--concurrency", default="1,4")
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
    exe = os.path.join(ROOT, "target", "release", "promptmill")
    rows = []
    for c in [int(x) for x in a.concurrency.split(",")]:
        best = None
        for _ in range(a.repeat):
            out = os.path.join(work, f"local_c{c}.jsonl")
            cmd = [exe, "--quiet", "run", "jobs/quickstart.toml", "--fresh", "--input", inp,
                   "--output", out, "--concurrency", str(c)]
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
    print("\n| concurrency | generated tokens/s | rows/s |\n| --- | --- | --- |")
    for c, tps, s in rows:
        print(f"| {c} | {tps:.1f} | {s['rows_per_s']:.2f} |")

if __name__ == "__main__":
    main()
