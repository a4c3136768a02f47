#!/usr/bin/env python3
"""promptmill throughput benchmark: the release binary against the fake OpenAI server on
127.0.0.1 (nothing leaves the machine). Python 3 standard library only.

    python3 bench/run.py                 # every scenario, the issue's default sizes
    python3 bench/run.py --only 1,5      # some scenarios
    python3 bench/run.py --help          # sizes, paths, load generator

Prints each scenario's figures and the exact command(s) behind them, then a results table,
also written to bench/results.md. See bench/README.md.
"""

import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODEL = "gpt-4o-mini"
SYSTEM = "You are terse."

# ---------------------------------------------------------------------------------------------
# processes


class Measured:
    """A finished child: wall time, CPU (user+sys) and peak RSS from wait4's rusage."""

    def __init__(self, cmd, code, wall, user, sys_, maxrss_kb, log):
        self.cmd, self.code, self.wall = cmd, code, wall
        self.user, self.sys, self.maxrss_kb, self.log = user, sys_, maxrss_kb, log

    @property
    def cpu(self):
        return self.user + self.sys

    @property
    def rss_mb(self):
        return self.maxrss_kb / 1024.0


GNU_TIME = "/usr/bin/time"


def measure(cmd, cwd, env, log_path, timeout=None):
    """Runs cmd to the end; stdout+stderr go to log_path (no pipe to fill).

    CPU from wait4's rusage. Peak RSS from GNU time (`/usr/bin/time -f %M`) when installed:
    wait4's ru_maxrss cannot be used for it, because Linux carries the parent's high-water
    mark over fork and exec, so a child of this Python process never reads below Python's own
    RSS (about 20 MB). Without GNU time the figure is wait4's, marked as an upper bound."""
    rss_file = log_path + ".rss"
    full = cmd
    if os.access(GNU_TIME, os.X_OK):
        full = [GNU_TIME, "-f", "%M", "-o", rss_file, *cmd]
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        p = subprocess.Popen(full, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.01)
        wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    maxrss = ru.ru_maxrss
    if full is not cmd:
        try:
            with open(rss_file) as f:
                lines = [l for l in f.read().split() if l.isdigit()]
            maxrss = int(lines[-1])
        except (OSError, IndexError, ValueError):
            pass
    return Measured(cmd, p.returncode, wall, ru.ru_utime, ru.ru_stime, maxrss, log_path)


class FakeServer:
    def __init__(self, binary, latency_ms=0, rpm=None, tpm=None, window_s=10.0, extra=()):
        cmd = [binary, "--port", "0", "--latency-ms", str(latency_ms), "--no-record", *extra]
        if rpm:
            cmd += ["--rpm", str(rpm)]
        if tpm:
            cmd += ["--tpm", str(tpm)]
        if rpm or tpm:
            cmd += ["--window-s", str(window_s)]
        self.cmd = cmd
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise SystemExit(f"fake_openai did not start: {line!r}")
        self.base_url = line.split()[-1]  # http://127.0.0.1:PORT/v1
        self.root = self.base_url.rsplit("/v1", 1)[0]

    def stats(self):
        with urllib.request.urlopen(self.root + "/stats", timeout=10) as r:
            return json.load(r)

    def admin(self, path):
        req = urllib.request.Request(self.root + path, data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.read()

    def stop(self):
        """SIGTERM; returns the final stats and the server's own CPU seconds."""
        self.p.send_signal(signal.SIGTERM)
        out = self.p.stdout.read()
        _, status, ru = os.wait4(self.p.pid, 0)
        self.p.returncode = os.waitstatus_to_exitcode(status)
        last = [l for l in out.splitlines() if l.startswith("{")]
        return (json.loads(last[-1]) if last else None), ru.ru_utime + ru.ru_stime

    def __enter__(self):
        return self

    def __exit__(self, *a):
        if self.p.returncode is None:
            self.stop()


def cmdline(cmd, env_extra=None):
    pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env_extra or {}).items())
    return (pre + " " if pre else "") + " ".join(shlex.quote(c) for c in cmd)


# ---------------------------------------------------------------------------------------------
# inputs and jobs

WORDS = (
    "the of and to in is was for that on with as by at from his her an which this be are "
    "have had not but what all were when we there can been one if would will more their "
    "about so said some could them into other time only new these two may first then do any "
    "like my now over such our man me even most made after also did many before must through "
    "back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since "
    "against go came right used take three"
).split()


def prose(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_csv(path, rows, text_fn, tag="v1"):
    """id,text CSV; skipped when the file already has this many rows from the same generator
    (`tag` names the generator's version)."""
    marker = path + f".{rows}.{tag}.ok"
    if os.path.exists(path) and os.path.exists(marker):
        return
    with open(path, "w", newline="") as f:
        f.write("id,text\n")
        buf = []
        for i in range(1, rows + 1):
            buf.append(f"r{i},{text_fn(i)}\n")
            if len(buf) >= 10000:
                f.write("".join(buf))
                buf.clear()
        f.write("".join(buf))
    open(marker, "w").close()


def write_job(work, name, input_path, base_url, user_content, max_tokens, concurrency,
              rpm=None, tpm=None, system=True, max_retries=6):
    out = os.path.join(work, "out", name + ".jsonl")
    run = [f"concurrency = {concurrency}", f"max_retries = {max_retries}", "timeout_s = 60"]
    if rpm:
        run.append(f"rpm = {rpm}")
    if tpm:
        run.append(f"tpm = {tpm}")
    msgs = ""
    if system:
        msgs += f'[[messages]]\nrole = "system"\ncontent = "{SYSTEM}"\n\n'
    msgs += f'[[messages]]\nrole = "user"\ncontent = """{user_content}"""\n'
    text = f"""# generated by bench/run.py
[input]
path = "{input_path}"

{msgs}
[model]
name = "{MODEL}"
base_url = "{base_url}"
max_tokens = {max_tokens}

[run]
{chr(10).join(run)}

[output]
path = "{out}"
"""
    path = os.path.join(work, name + ".toml")
    with open(path, "w") as f:
        f.write(text)
    return path, out


def clean_output(out):
    d = os.path.dirname(out)
    base = os.path.basename(out)
    if os.path.isdir(d):
        for f in os.listdir(d):
            if f.startswith(base):
                os.remove(os.path.join(d, f))


# ---------------------------------------------------------------------------------------------
# the bench


class Bench:
    def __init__(self, a):
        self.a = a
        self.work = os.path.abspath(a.work)
        os.makedirs(os.path.join(self.work, "out"), exist_ok=True)
        self.pm = os.path.abspath(a.promptmill)
        self.fake = os.path.abspath(a.fake_openai)
        self.env = dict(os.environ)
        self.env["OPENAI_API_KEY"] = "sk-bench-dummy"
        for k in ("OPENAI_BASE_URL", "PROMPTMILL_LOG", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                  "https_proxy", "ALL_PROXY", "all_proxy"):
            self.env.pop(k, None)
        self.env["NO_PROXY"] = "127.0.0.1,localhost"
        self.results = []  # (scenario, figures, target, met)
        self.commands = []

    def say(self, *a):
        print(*a, flush=True)

    def log(self, name):
        return os.path.join(self.work, name + ".log")

    def scale_run(self, server, job, out, rows, name):
        """One scale run from an empty output: prints its rate, CPU and peak RSS; returns the
        measurement and the requests the server saw."""
        clean_output(out)
        before = server.stats()["requests"]
        m = self.pm_run(job, name)
        sent = server.stats()["requests"] - before
        self.say(f"  {rows} rows: {m.wall:.1f}s = {rows / m.wall:.0f} rows/s, CPU "
                 f"{m.cpu:.1f}s = {m.cpu / rows * 1e6:.0f} ms/1k rows, peak RSS "
                 f"{m.rss_mb:.1f} MB, {sent} requests")
        return m, sent

    def pm_run(self, job, name, extra=()):
        cmd = [self.pm, "--quiet", "run", job, *extra]
        m = measure(cmd, self.work, self.env, self.log(name))
        self.say(f"  $ {cmdline(cmd, {'OPENAI_API_KEY': 'sk-bench-dummy'})}")
        if m.code != 0:
            self.say(f"  ! exit {m.code}; log {m.log}:")
            with open(m.log, errors="replace") as f:
                self.say("    " + f.read()[-2000:].replace("\n", "\n    "))
        return m

    def record(self, scenario, figures, target, met):
        self.results.append((scenario, figures, target, met))
        self.say(f"  => {figures}  [{target}: {'MET' if met else 'MISSED'}]")

    # -- the load generator ---------------------------------------------------------------

    def loadgen(self, server, n, conc, body):
        """Requests/s of a plain HTTP load generator at the same concurrency."""
        url = server.base_url + "/chat/completions"
        wrk = shutil.which("wrk")
        if self.a.loadgen in ("auto", "wrk") and wrk:
            return self.wrk(wrk, url, conc, body)
        if self.a.loadgen == "wrk":
            self.say("  ! wrk is not installed (Debian: apt-get install -y wrk): falling back")
        oha = self.a.oha or shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")
        if self.a.loadgen in ("auto", "oha") and oha and os.path.exists(oha):
            body_path = os.path.join(self.work, "body.json")
            with open(body_path, "w") as f:
                f.write(body)
            cmd = [oha, "-n", str(n), "-c", str(conc), "-m", "POST",
                   "-H", "content-type: application/json", "-H", "authorization: Bearer sk-bench-dummy",
                   "-D", body_path, "--no-tui", "--output-format", "json", url]
            m = measure(cmd, self.work, self.env, self.log("loadgen"))
            self.say(f"  $ {cmdline(cmd)}")
            try:
                with open(m.log) as f:
                    text = f.read()
                j = json.loads(text[text.index("{"):])
                rps = j["summary"]["requestsPerSec"]
                ok = j.get("statusCodeDistribution", {})
                self.say(f"  oha: {rps:.0f} req/s, status codes {ok}, {m.cpu:.2f} CPU s")
                return rps, "oha"
            except Exception as e:  # noqa: BLE001
                self.say(f"  ! could not read oha's output ({e}); log {m.log}")
                if self.a.loadgen == "oha":
                    return None, "oha"
        load = self.a.load_example
        if not os.path.exists(load):
            self.say(f"  ! no load generator ({load} missing: "
                     "cargo build --release -p fake_openai --example load)")
            return None, None
        cmd = [load, str(n), str(conc), server.base_url]
        m = measure(cmd, self.work, self.env, self.log("loadgen"))
        self.say(f"  $ {cmdline(cmd)}")
        with open(m.log) as f:
            text = f.read().strip()
        self.say(f"  load: {text.splitlines()[-1] if text else '(no output)'}")
        try:
            rps = float(text.split(",")[-1].split()[0])
        except (ValueError, IndexError):
            return None, "fake_openai example load"
        return rps, "fake_openai example load (reqwest; its own fixed body)"

    def wrk(self, wrk, url, conc, body):
        """`wrk -t1 -c CONC` posting the same body for --wrk-seconds: requests/s."""
        script = os.path.join(self.work, "post.lua")
        with open(script, "w") as f:
            f.write('wrk.method = "POST"\n'
                    f"wrk.body = {json.dumps(body)}\n"
                    'wrk.headers["Content-Type"] = "application/json"\n'
                    'wrk.headers["Authorization"] = "Bearer sk-bench-dummy"\n')
        cmd = [wrk, "-t1", f"-c{conc}", f"-d{self.a.wrk_seconds}s", "-s", script, url]
        m = measure(cmd, self.work, self.env, self.log("loadgen"))
        self.say(f"  $ {cmdline(cmd)}")
        with open(m.log) as f:
            text = f.read()
        rps = None
        for line in text.splitlines():
            if line.startswith("Requests/sec:"):
                rps = float(line.split()[1])
            if "Non-2xx" in line:
                self.say(f"  ! wrk: {line.strip()}")
        self.say(f"  wrk: {rps or 0:.0f} req/s, {m.cpu:.2f} CPU s")
        return rps, "wrk -t1"

    # -- scenarios ------------------------------------------------------------------------

    def s1_overhead(self):
        a = self.a
        n, conc = a.overhead_rows, 64
        self.say(f"\n## 1. Overhead-bound: {n} rows, 0 ms latency, no limits, concurrency {conc}")
        inp = os.path.join(self.work, f"overhead_{n}.csv")
        rng = random.Random(1)
        write_csv(inp, n, lambda i: f"row {i}: {prose(rng, 12)}")
        content = "Summarise in five words: {{ text }}"
        reps = max(1, a.repeat)
        lg, pm = [], []
        with FakeServer(self.fake) as s:
            self.say(f"  server: {cmdline(s.cmd)}")
            body = json.dumps({"model": MODEL, "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Summarise in five words: row 1: " + prose(random.Random(1), 12)}],
                "max_tokens": 16}, separators=(",", ":"))
            job, out = write_job(self.work, "overhead", inp, s.base_url, content, 16, conc)
            # Alternate the two, `reps` times each, and take the medians: one run is noisy.
            for r in range(reps):
                self.say(f"  -- round {r + 1}/{reps}")
                lg_rps, lg_name = self.loadgen(s, n, conc, body)
                lg.append(lg_rps or 0.0)
                before = s.stats()["requests"]
                clean_output(out)
                m = self.pm_run(job, "overhead")
                sent = s.stats()["requests"] - before
                self.say(f"  promptmill: {n} rows in {m.wall:.2f}s = {n / m.wall:.0f} rows/s; CPU "
                         f"{m.user:.2f}u+{m.sys:.2f}s = {m.cpu / n * 1e6:.0f} ms/1k rows; peak RSS "
                         f"{m.rss_mb:.1f} MB; server saw {sent} requests")
                pm.append((m, sent))
            _, srv_cpu = s.stop()
        lg_rps = median(lg) if all(lg) else None
        m, sent = sorted(pm, key=lambda x: x[0].wall)[len(pm) // 2]  # the median run
        rps = n / m.wall
        cpu_per_k = m.cpu / n * 1000 * 1000  # ms per 1,000 rows
        frac = rps / lg_rps if lg_rps else float("nan")
        self.say(f"  medians of {reps}: promptmill {rps:.0f} rows/s, {cpu_per_k:.0f} ms CPU/1k rows;"
                 f" {lg_name} {lg_rps or 0:.0f} req/s; server CPU {srv_cpu:.1f}s in all")
        # Issue 20's targets: the wire's speed (wrk's rate) and 40 ms of CPU per 1,000 rows.
        ok1 = all(x.code == 0 and y == n for x, y in pm) and lg_rps is not None and frac >= 1.0
        self.record("1 overhead: rows/s vs load generator",
                    f"{rps:.0f} rows/s vs {lg_name} {lg_rps or 0:.0f} req/s = {frac:.0%} "
                    f"(medians of {reps})",
                    ">= 100%", ok1)
        self.record("1 overhead: CPU per 1,000 rows",
                    f"{cpu_per_k:.0f} ms (user {m.user:.2f}s + sys {m.sys:.2f}s over {n} rows); "
                    f"peak RSS {m.rss_mb:.1f} MB", "<= 40 ms", m.code == 0 and cpu_per_k <= 40)

    def s11_parquet(self):
        """Parquet in and out beside the same job from CSV: rows/s and peak RSS of each."""
        n = self.a.parquet_rows
        self.say(f"\n## 11. Parquet: {n} rows in (row groups of 100,000), run against the fake "
                 f"server at 0 ms, Parquet out; beside the same job from CSV")
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            self.say("  ! pyarrow is missing (pip install pyarrow): scenario 11 skipped")
            self.record("11 parquet", "not run: no pyarrow", "RSS < 100 MB", False)
            return
        csv_in = os.path.join(self.work, f"parquet_{n}.csv")
        rng = random.Random(11)
        write_csv(csv_in, n, lambda i: f"row {i}: {prose(rng, 12)}")
        pq_in = os.path.join(self.work, f"parquet_{n}.parquet")
        if not os.path.exists(pq_in + ".ok"):
            # The same rows as the CSV, and two columns the job does not read (never decoded).
            ids, texts = [], []
            with open(csv_in) as f:
                next(f)
                for line in f:
                    i, t = line.rstrip("\n").split(",", 1)
                    ids.append(i)
                    texts.append(t)
            table = pa.table({"id": ids, "text": texts,
                              "unused_n": pa.array(range(len(ids)), pa.int64()),
                              "unused_s": pa.array(["x" * 200] * len(ids))})
            pq.write_table(table, pq_in, row_group_size=100_000, compression="snappy")
            del table, ids, texts
            open(pq_in + ".ok", "w").close()
        content = "Summarise in five words: {{ text }}"
        figures = {}
        with FakeServer(self.fake) as s:
            self.say(f"  server: {cmdline(s.cmd)}")
            for kind, inp in (("csv", csv_in), ("parquet", pq_in)):
                name = f"pq_{kind}"
                job, out = write_job(self.work, name, inp, s.base_url, content, 16, 64)
                if kind == "parquet":
                    with open(job) as f:
                        text = f.read()
                    text = text.replace(f'path = "{out}"',
                                        f'path = "{out}"\nparquet = "{out[:-6]}.parquet"')
                    text = text.replace(f'path = "{inp}"', f'path = "{inp}"\nid = "id"')
                    with open(job, "w") as f:
                        f.write(text)
                m, sent = self.scale_run(s, job, out, n, name)
                figures[kind] = (m, sent)
            s3 = self.s11_on_s3(s, pq_in, content, n)
            s.stop()
        (mc, _), (mp, sent) = figures["csv"], figures["parquet"]
        pq_out = os.path.join(self.work, "out", "pq_parquet.parquet")
        rows_out = pq.ParquetFile(pq_out).metadata.num_rows if os.path.exists(pq_out) else 0
        self.say(f"  Parquet out: {rows_out} rows, {os.path.getsize(pq_out) / 1e6:.1f} MB"
                 if rows_out else "  ! no Parquet output")
        ok = mp.code == 0 and sent == n and rows_out == n
        self.record("11 parquet in and out vs CSV",
                    f"Parquet: {n / mp.wall:.0f} rows/s, peak RSS {mp.rss_mb:.1f} MB; CSV: "
                    f"{n / mc.wall:.0f} rows/s, peak RSS {mc.rss_mb:.1f} MB",
                    "RSS < 100 MB", ok and mp.rss_mb < 100)
        if s3 is not None:
            m3, sent3, rows3 = s3
            ok3 = m3.code == 0 and sent3 == n and rows3 == n
            self.record("11 parquet in, parquet out on a local S3 server (moto)",
                        f"{n / m3.wall:.0f} rows/s, CPU {m3.cpu / n * 1e6:.0f} ms/1k rows, peak RSS "
                        f"{m3.rss_mb:.1f} MB ({rows3} rows in the table on the store)",
                        "RSS < 100 MB", ok3 and m3.rss_mb < 100)

    def s11_on_s3(self, server, pq_in, content, n):
        """The Parquet job with its input and every output on moto's S3 server (127.0.0.1):
        the input fetched, the journal checkpointed every 10 s, the outputs published."""
        import shutil
        import socket
        import subprocess
        moto = shutil.which("moto_server")
        try:
            import boto3
        except ImportError:
            boto3 = None
        if not moto or boto3 is None:
            self.say("  ! moto_server or boto3 missing (pip install 'moto[server]'): S3 half skipped")
            self.record("11 parquet on S3", "not run: no moto", "RSS < 100 MB", False)
            return None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        log = open(self.log("moto"), "w")
        proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
        try:
            endpoint = f"http://127.0.0.1:{port}"
            c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                             aws_secret_access_key="bench-secret", region_name="us-east-1")
            for _ in range(100):
                try:
                    c.create_bucket(Bucket="bench")
                    break
                except Exception:
                    time.sleep(0.1)
            c.upload_file(pq_in, "bench", "in/rows.parquet")
            job, out = write_job(self.work, "pq_s3", "s3://bench/in/rows.parquet", server.base_url,
                                 content, 16, 64)
            with open(job) as f:
                text = f.read()
            text = text.replace(f'path = "{out}"', 'path = "s3://bench/out/pq_s3.jsonl"\n'
                                'parquet = "s3://bench/out/pq_s3.parquet"')
            text = text.replace('path = "s3://bench/in/rows.parquet"',
                                'path = "s3://bench/in/rows.parquet"\nid = "id"')
            with open(job, "w") as f:
                f.write(text)
            work = os.path.join(self.work, "pq_s3_pod")
            shutil.rmtree(work, ignore_errors=True)
            env = dict(self.env, AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true",
                       AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                       AWS_REGION="us-east-1", PROMPTMILL_WORK_DIR=work)
            saved, self.env = self.env, env
            before = server.stats()["requests"]
            try:
                m = self.pm_run(job, "pq_s3")
            finally:
                self.env = saved
            sent = server.stats()["requests"] - before
            local = os.path.join(self.work, "pq_s3_table.parquet")
            try:
                c.download_file("bench", "out/pq_s3.parquet", local)
                import pyarrow.parquet as pq
                rows = pq.ParquetFile(local).metadata.num_rows
            except Exception as e:
                self.say(f"  ! no Parquet table on the store: {e}")
                rows = 0
            self.say(f"  S3: {n} rows: {m.wall:.1f}s = {n / m.wall:.0f} rows/s, CPU "
                     f"{m.cpu:.1f}s = {m.cpu / n * 1e6:.0f} ms/1k rows, peak RSS {m.rss_mb:.1f} MB, "
                     f"{sent} requests, {rows} rows in s3://bench/out/pq_s3.parquet")
            return m, sent, rows
        finally:
            proc.terminate()
            proc.wait()
            log.close()

    def _quota(self, label, name, rows, conc, job_rpm):
        self.say(f"\n## {label}")
        inp = os.path.join(self.work, f"quota_{rows}.csv")
        rng = random.Random(2)
        write_csv(inp, rows, lambda i: f"row {i}: {prose(rng, 12)}")
        with FakeServer(self.fake, latency_ms=200, rpm=3000, window_s=10) as s:
            self.say(f"  server: {cmdline(s.cmd)}")
            job, out = write_job(self.work, name, inp, s.base_url, "Summarise: {{ text }}", 16,
                                 conc, rpm=job_rpm)
            clean_output(out)
            m = self.pm_run(job, name)
            st, _ = s.stop()
        ok, req, rl = st["ok"], st["requests"], st["rate_limited"]
        rate = ok / st["elapsed_s"] if st["elapsed_s"] else 0
        self.say(f"  server: {req} requests, {ok} ok, {rl} 429s, first→last {st['elapsed_s']:.2f}s; "
                 f"promptmill wall {m.wall:.2f}s, exit {m.code}")
        return m, st, rate, ok, req, rl

    def s2_quota_known(self):
        rows = self.a.quota_rows
        m, st, rate, ok, req, rl = self._quota(
            f"2. Quota-bound, limits known: {rows} rows, 200 ms latency, server 3000 rpm / 10 s "
            f"window, job rpm 3000, concurrency 64", "quota_known", rows, 64, 3000)
        self.record("2 quota known: achieved rate",
                    f"{rate:.2f} req/s = {rate / 50:.1%} of 50/s; {rl} 429s of {req} requests",
                    ">= 97%, zero 429s", m.code == 0 and rate / 50 >= 0.97 and rl == 0)

    def s3_quota_unknown(self):
        rows = self.a.quota_rows
        m, st, rate, ok, req, rl = self._quota(
            f"3. Quota-bound, limits unknown: {rows} rows, same server, job rpm unset, "
            f"concurrency 200", "quota_unknown", rows, 200, None)
        share = rl / req if req else 0
        self.record("3 quota unknown: achieved rate",
                    f"{rate:.2f} req/s = {rate / 50:.1%} of 50/s; {rl} 429s = {share:.2%} of {req}",
                    ">= 90%, 429s < 2%", m.code == 0 and rate / 50 >= 0.90 and share < 0.02)

    def s4_tokens(self):
        a = self.a
        rows, tpm, max_tokens = a.token_rows, 300_000, 100
        self.say(f"\n## 4. Token-bound: {rows} rows of ~1,000-token prompts, 200 ms latency, "
                 f"server tpm {tpm} / 10 s window, job tpm {tpm}")
        inp = os.path.join(self.work, f"tokens_{rows}.csv")
        rng = random.Random(4)
        write_csv(inp, rows, lambda i: token_text(rng, i), tag=f"numbers{NUMBER_SHARE}")
        with FakeServer(self.fake, latency_ms=200, tpm=tpm, window_s=10) as s:
            self.say(f"  server: {cmdline(s.cmd)}")
            job, out = write_job(self.work, "tokens", inp, s.base_url, "{{ text }}", max_tokens,
                                 64, tpm=tpm, system=False)
            clean_output(out)
            # What promptmill counts (tiktoken) for the same rows, to compare with the server.
            est = measure([self.pm, "--quiet", "estimate", job], self.work, self.env,
                          self.log("tokens_estimate"))
            m = self.pm_run(job, "tokens")
            st, _ = s.stop()
        client_prompt = None
        with open(est.log) as f:
            for line in f:
                if line.startswith("prompt tokens"):
                    client_prompt = int(line.split()[2])
        req, ok, rl = st["requests"], st["ok"], st["rate_limited"]
        tok_min = st["tokens_admitted"] / st["elapsed_s"] * 60 if st["elapsed_s"] else 0
        server_prompt = st["tokens_admitted"] - ok * max_tokens  # when every request was once
        note = ""
        if client_prompt and rl == 0 and ok == rows:
            note = (f"; per request: promptmill counts {client_prompt / rows + max_tokens:.0f}, "
                    f"server {server_prompt / rows + max_tokens:.0f} tokens")
        self.say(f"  server: {req} requests, {ok} ok, {rl} 429s, {st['tokens_admitted']} tokens "
                 f"admitted, first→last {st['elapsed_s']:.2f}s{note}")
        self.record("4 tokens: achieved server-side tokens/min",
                    f"{tok_min:.0f} tokens/min = {tok_min / tpm:.1%} of {tpm}; {rl} 429s{note}",
                    ">= 95%, zero 429s", m.code == 0 and tok_min / tpm >= 0.95 and rl == 0)

    def s5_to_s7(self):
        a = self.a
        big, base = a.scale_rows, a.scale_base_rows
        text = lambda rng: (lambda i: f"row {i}: {prose(rng, 12)}")  # noqa: E731
        inp_base = os.path.join(self.work, f"scale_{base}.csv")
        inp_big = os.path.join(self.work, f"scale_{big}.csv")
        t0 = time.monotonic()
        write_csv(inp_base, base, text(random.Random(5)))
        write_csv(inp_big, big, text(random.Random(5)))
        self.say(f"\n(inputs: {inp_base}, {inp_big}: {time.monotonic() - t0:.1f}s)")
        with FakeServer(self.fake) as s:
            jb, out_b = write_job(self.work, f"scale_{base}", inp_base, s.base_url,
                                  "Summarise in five words: {{ text }}", 16, 64)
            jB, out_B = write_job(self.work, f"scale_{big}", inp_big, s.base_url,
                                  "Summarise in five words: {{ text }}", 16, 64)
            if "6" in a.only:
                self.say(f"\n## 6. Dry run: promptmill estimate on {base} rows")
                clean_output(out_b)
                cmd = [self.pm, "--quiet", "estimate", jb]
                m = measure(cmd, self.work, self.env, self.log("estimate"))
                self.say(f"  $ {cmdline(cmd)}")
                with open(m.log) as f:
                    rows_line = [l.strip() for l in f if l.startswith("rows ")]
                self.say(f"  {rows_line[0] if rows_line else '?'}; {m.wall:.2f}s wall, "
                         f"CPU {m.cpu:.2f}s, peak RSS {m.rss_mb:.1f} MB")
                self.record(f"6 dry run: estimate of {base} rows",
                            f"{m.wall:.2f}s (peak RSS {m.rss_mb:.1f} MB)", "< 10 s",
                            m.code == 0 and m.wall < 10)
            if "5" in a.only or "7" in a.only:
                self.say(f"\n## 5. Scale: {base} rows, then {big} rows, 0 ms latency, "
                         f"concurrency 64")
                mb, _ = self.scale_run(s, jb, out_b, base, "scale_base")
            if "7" in a.only:
                self.say(f"\n## 7. Resume: the finished {base}-row job again")
                before = s.stats()["requests"]
                m7 = self.pm_run(jb, "resume")
                sent = s.stats()["requests"] - before
                self.say(f"  {sent} requests sent, {m7.wall:.2f}s wall, CPU {m7.cpu:.2f}s, peak RSS "
                         f"{m7.rss_mb:.1f} MB, exit {m7.code}")
                self.record(f"7 resume: rerun of a finished {base}-row job",
                            f"{sent} requests, {m7.wall:.2f}s", "0 requests, < 2 s",
                            m7.code == 0 and sent == 0 and m7.wall < 2)
            if "5" in a.only:
                mB, sent_B = self.scale_run(s, jB, out_B, big, "scale_big")
                ratio = mB.rss_mb / mb.rss_mb
                self.record(f"5 scale: peak RSS, {big} vs {base} rows",
                            f"{mB.rss_mb:.1f} MB vs {mb.rss_mb:.1f} MB (+{ratio - 1:.1%}); "
                            f"{big / mB.wall:.0f} rows/s",
                            "< 100 MB and <= +10%",
                            mB.code == 0 and mb.code == 0 and sent_B == big and mB.rss_mb < 100
                            and ratio <= 1.10)
                if not a.keep_outputs:
                    clean_output(out_B)

    def s8_batch(self):
        a = self.a
        rows = a.batch_rows
        self.say(f"\n## 8. Batch API: {rows} rows prepared and submitted, then collected")
        inp = os.path.join(self.work, f"scale_{rows}.csv")
        write_csv(inp, rows, (lambda rng: (lambda i: f"row {i}: {prose(rng, 12)}"))(random.Random(5)))
        with FakeServer(self.fake) as s:
            self.say(f"  server: {cmdline(s.cmd)}")
            job, out = write_job(self.work, f"batch_{rows}", inp, s.base_url,
                                 "Summarise in five words: {{ text }}", 16, 64)
            with open(job) as f:
                text = f.read()
            with open(job, "w") as f:
                f.write(text.replace("[run]\n", "[run]\nmode = \"batch\"\n"))
            shutil.rmtree(out + ".batches.d", ignore_errors=True)
            clean_output(out)
            m1 = self.pm_run(job, "batch_submit")
            st = s.stats()
            self.say(f"  submit: {m1.wall:.1f}s wall, CPU {m1.cpu:.1f}s, peak RSS {m1.rss_mb:.1f} MB; "
                     f"server: {st.get('files_uploaded')} files, {st.get('batches_created')} batches")
            t0 = time.monotonic()
            for _ in range(4):  # validating → in_progress → finalizing → completed
                s.admin("/_fake/batches/advance")
            self.say(f"  (the fake server ran the batches in {time.monotonic() - t0:.1f}s)")
            cmd = [self.pm, "--quiet", "batch", "collect", job]
            m2 = measure(cmd, self.work, self.env, self.log("batch_collect"))
            self.say(f"  $ {cmdline(cmd)}")
            recs = 0
            if os.path.exists(out):
                with open(out, "rb") as f:
                    recs = sum(1 for _ in f)
            self.say(f"  collect: {m2.wall:.1f}s wall, CPU {m2.cpu:.1f}s, peak RSS {m2.rss_mb:.1f} MB; "
                     f"{recs} records")
        ok = m1.code == 0 and m2.code == 0 and recs == rows
        self.record(f"8 batch: submit {rows} rows",
                    f"{m1.wall:.1f}s, peak RSS {m1.rss_mb:.1f} MB", "< 60 s, < 100 MB",
                    ok and m1.wall < 60 and m1.rss_mb < 100)
        self.record(f"8 batch: collect {rows} results",
                    f"{m2.wall:.1f}s, peak RSS {m2.rss_mb:.1f} MB", "< 60 s, < 100 MB",
                    ok and m2.wall < 60 and m2.rss_mb < 100)
        if not a.keep_outputs:
            shutil.rmtree(out + ".batches.d", ignore_errors=True)
            clean_output(out)

    def s9_merge(self):
        a = self.a
        shards, per = a.merge_shards, a.merge_rows
        self.say(f"\n## 9. Merge: {shards} shard outputs of {per} rows each")
        d = os.path.join(self.work, "merge")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        t0 = time.monotonic()
        total = shards * per
        stamp = {"job": "bench.toml", "model": MODEL, "params": "0" * 32, "messages": "1" * 32,
                 "input_rows": total}
        for k in range(1, shards + 1):
            out = os.path.join(d, f"m.shard-{k}-of-{shards}.jsonl")
            with open(out, "w") as f:
                buf = []
                # Rows dealt round-robin: every shard holds rows from all over the input.
                for row in range(k, total + 1, shards):
                    buf.append(
                        '{"row":%d,"id":"%d","status":"ok","input":{"text":"row %d"},'
                        '"completion":"echo: row %d","finish_reason":"stop","model":"%s",'
                        '"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16},'
                        '"cost_usd":0.0000042,"attempts":1,"latency_ms":%d,'
                        '"fingerprint":"%032x","error":null}\n'
                        % (row, row, row, row, MODEL, 50 + row % 100, row))
                    if len(buf) >= 10000:
                        f.write("".join(buf))
                        buf.clear()
                f.write("".join(buf))
            with open(out + ".job.json", "w") as f:
                json.dump(dict(stamp, shard={"k": k, "n": shards}, rows=per), f)
        self.say(f"  (outputs written in {time.monotonic() - t0:.1f}s)")
        cmd = [self.pm, "--quiet", "merge", os.path.join(d, "m.shard-*.jsonl"),
               "--csv", os.path.join(d, "m.csv")]
        m = measure(cmd, self.work, self.env, self.log("merge"))
        self.say(f"  $ {cmdline(cmd)}")
        rows = 0
        if os.path.exists(os.path.join(d, "m.jsonl")):
            with open(os.path.join(d, "m.jsonl"), "rb") as f:
                rows = sum(1 for _ in f)
        self.say(f"  {rows} rows merged: {m.wall:.1f}s wall, CPU {m.cpu:.1f}s, peak RSS "
                 f"{m.rss_mb:.1f} MB, exit {m.code}")
        self.record(f"9 merge: {shards} shards x {per} rows (JSONL, CSV, summary)",
                    f"{m.wall:.1f}s, peak RSS {m.rss_mb:.1f} MB", "< 5 s, flat memory",
                    m.code == 0 and rows == total and m.wall < 5 and m.rss_mb < 50)
        if not a.keep_outputs:
            shutil.rmtree(d, ignore_errors=True)

    def s10_structured(self):
        a = self.a
        rows = a.overhead_rows
        self.say(f"\n## 10. Structured output: {rows} rows with a schema validated on every row, "
                 f"against the same rows as plain text")
        inp = os.path.join(self.work, f"structured_{rows}.csv")
        write_csv(inp, rows, (lambda rng: (lambda i: f"row {i}: {prose(rng, 12)}"))(random.Random(10)))
        schema = os.path.join(self.work, "ad_schema.json")
        with open(schema, "w") as f:
            json.dump({"type": "object", "properties": {
                "headline": {"type": "string", "maxLength": 30},
                "description": {"type": "string", "maxLength": 90},
                "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["headline", "description", "tags"],
                "additionalProperties": False}, f)
        figures = {}
        for kind in ("plain", "schema"):
            s = FakeServer(self.fake)
            self.say(f"  server: {cmdline(s.cmd)}")
            if True:
                job, out = write_job(self.work, f"structured_{kind}", inp, s.base_url,
                                     "Ad for: {{ text }}", 200, 64)
                if kind == "schema":
                    with open(job, "a") as f:
                        f.write(f'schema = "{schema}"\n')
                cpus = []
                for _ in range(a.repeat):
                    clean_output(out)
                    m = self.pm_run(job, f"structured_{kind}")
                    cpus.append(m.cpu / rows * 1e6)
                _, server_cpu = s.stop()
                figures[kind] = (median(cpus), m)
                self.say(f"  {kind}: CPU {median(cpus):.0f} ms per 1,000 rows (median of "
                         f"{a.repeat}), {rows / m.wall:.0f} rows/s, peak RSS {m.rss_mb:.1f} MB; "
                         f"the fake server's CPU {server_cpu / (rows * a.repeat) * 1e6:.0f} ms "
                         f"per 1,000 answers")
                if not a.keep_outputs:
                    clean_output(out)
        plain, schema_ = figures["plain"][0], figures["schema"][0]
        ratio = schema_ / plain
        self.record("10 structured: CPU per 1,000 rows, schema vs plain",
                    f"{schema_:.0f} vs {plain:.0f} ms (+{ratio - 1:.0%})", "within 20%",
                    figures["schema"][1].code == 0 and ratio <= 1.2)

    def s12_ledger(self):
        """Scenario 12: the ledger at 1,000,000 and 10,000,000 rows, each from an empty output:
        the run, a rerun that sends nothing, a dry run and `status` of the finished output, and
        a compaction that rewrites every record (one row inserted at the top: one request, every
        other row renumbered). Peak RSS of each, time of each."""
        for rows in self.a.ledger_rows:
            limit = 64 if rows <= 1_000_000 else 100
            self.say(f"\n## 12. Ledger at {rows} rows: run, rerun, dry run, status, compaction "
                     f"(peak RSS target < {limit} MB)")
            inp = os.path.join(self.work, f"scale_{rows}.csv")
            t0 = time.monotonic()
            write_csv(inp, rows, (lambda rng: (lambda i: f"row {i}: {prose(rng, 12)}"))(
                random.Random(5)))
            ins = os.path.join(self.work, f"scale_{rows}_inserted.csv")
            if not os.path.exists(ins + ".ok"):
                with open(inp) as src, open(ins, "w") as dst:
                    dst.write(src.readline())
                    dst.write("r0,a row inserted at the top\n")
                    shutil.copyfileobj(src, dst, 1 << 20)
                open(ins + ".ok", "w").close()
            self.say(f"  (inputs {inp}, {ins}: {time.monotonic() - t0:.1f}s)")
            figures = []
            with FakeServer(self.fake) as s:
                self.say(f"  server: {cmdline(s.cmd)}")
                job, out = write_job(self.work, f"ledger_{rows}", inp, s.base_url,
                                     "Summarise in five words: {{ text }}", 16, 64)
                job_ins = job.replace(".toml", "_inserted.toml")
                with open(job) as f, open(job_ins, "w") as g:
                    g.write(f.read().replace(f'path = "{inp}"', f'path = "{ins}"'))
                clean_output(out)
                steps = [("run", ["run", job], rows), ("rerun", ["run", job], 0),
                         ("dry run", ["estimate", job], 0), ("status", ["status", job], 0),
                         ("compaction (1 row inserted at the top)", ["run", job_ins], 1)]
                for name, args, want in steps:
                    before = s.stats()["requests"]
                    cmd = [self.pm, "--quiet", *args]
                    m = measure(cmd, self.work, self.env, self.log(f"ledger_{rows}_{name[:6]}"))
                    sent = s.stats()["requests"] - before
                    self.say(f"  $ {cmdline(cmd, {'OPENAI_API_KEY': 'sk-bench-dummy'})}")
                    self.say(f"  {name}: {m.wall:.1f}s wall, CPU {m.cpu:.1f}s, peak RSS "
                             f"{m.rss_mb:.1f} MB, {sent} requests, exit {m.code}")
                    figures.append((name, m, sent == want and m.code == 0))
                size = os.path.getsize(out) if os.path.exists(out) else 0
                idx = out + ".index"
                isize = os.path.getsize(idx) if os.path.exists(idx) else 0
                self.say(f"  output {size / 1e6:.0f} MB ({size / rows:.0f} B/record), index file "
                         f"{isize / 1e6:.1f} MB ({isize / rows:.1f} B/record)")
            for name, m, ok in figures:
                target, met = f"< {limit} MB", ok and m.rss_mb < limit
                if rows >= 10_000_000 and name == "rerun":
                    target, met = target + ", < 60 s", met and m.wall < 60
                if rows >= 10_000_000 and name.startswith("compaction"):
                    target, met = target + ", < 120 s", met and m.wall < 120
                self.record(f"12 ledger, {rows} rows: {name}",
                            f"{m.wall:.1f}s, peak RSS {m.rss_mb:.1f} MB", target, met)
            if not self.a.keep_outputs:
                clean_output(out)

    # -- the table ------------------------------------------------------------------------

    def table(self):
        lines = ["| scenario | figures | target | met? |", "| --- | --- | --- | --- |"]
        for sc, fig, tgt, met in self.results:
            lines.append(f"| {sc} | {fig} | {tgt} | {'yes' if met else '**no**'} |")
        return "\n".join(lines)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


# The share of numbers among the words of scenario 4's prompts: o200k spends more tokens on
# numbers than on common words, so this sets how far promptmill's count is above the server's.
NUMBER_SHARE = 0.135


def token_text(rng, i):
    """~1,000 tiktoken tokens of prose with numbers: tiktoken counts these at a little more than
    the server's ceil(chars/4), so pacing on promptmill's count never overshoots the server."""
    parts = []
    while sum(len(p) + 1 for p in parts) < 3900:
        if rng.random() < NUMBER_SHARE:
            parts.append(str(rng.randint(100, 99999)))
        else:
            parts.append(rng.choice(WORDS))
    return f"Document {i}: " + " ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10,11,12", help="scenarios to run (default: all)")
    ap.add_argument("--parquet-rows", type=int, default=1_000_000, help="scenario 11's rows")
    ap.add_argument("--ledger-rows", default="1000000,10000000",
                    help="scenario 12's sizes, comma-separated")
    ap.add_argument("--merge-shards", type=int, default=10, help="scenario 9's shards")
    ap.add_argument("--merge-rows", type=int, default=100_000, help="scenario 9's rows per shard")
    ap.add_argument("--batch-rows", type=int, default=1_000_000, help="scenario 8's rows")
    ap.add_argument("--overhead-rows", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3,
                    help="scenario 1: rounds of load generator + promptmill (medians reported)")
    ap.add_argument("--quota-rows", type=int, default=1_500)
    ap.add_argument("--token-rows", type=int, default=150)
    ap.add_argument("--scale-rows", type=int, default=1_000_000)
    ap.add_argument("--scale-base-rows", type=int, default=100_000,
                    help="the baseline run for scenario 5, the dry run (6) and the resume (7)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="inputs, jobs, outputs, logs")
    ap.add_argument("--promptmill", default=os.path.join(ROOT, "target/release/promptmill"))
    ap.add_argument("--fake-openai", default=os.path.join(ROOT, "target/release/fake_openai"))
    ap.add_argument("--load-example", default=os.path.join(ROOT, "target/release/examples/load"))
    ap.add_argument("--loadgen", choices=["auto", "wrk", "oha", "load"], default="auto",
                    help="auto: wrk if installed (Debian's wrk), else oha, else fake_openai's "
                         "example `load`")
    ap.add_argument("--wrk-seconds", type=int, default=3, help="how long wrk runs per round")
    ap.add_argument("--oha", default=None, help="path to oha (default: on PATH or ~/.cargo/bin)")
    ap.add_argument("--build", action="store_true",
                    help="cargo build the release binaries first (HTTP-only promptmill)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the 1M-row output")
    ap.add_argument("--results", default=os.path.join(HERE, "results.md"))
    a = ap.parse_args()
    a.only = set(x.strip() for x in a.only.split(","))
    a.ledger_rows = [int(x) for x in a.ledger_rows.split(",") if x.strip()]

    if a.build:
        for cmd in (["cargo", "build", "--release", "--no-default-features"],
                    ["cargo", "build", "--release", "-p", "fake_openai", "--example", "load",
                     "--bin", "fake_openai"]):
            print("$ " + cmdline(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
    for p in (a.promptmill, a.fake_openai):
        if not os.path.exists(p):
            raise SystemExit(f"{p} is missing: run with --build, or see bench/README.md")

    b = Bench(a)
    t0 = time.monotonic()
    print(f"# promptmill benchmark ({os.cpu_count()} CPUs); work folder {b.work}")
    print(f"$ {cmdline([sys.executable, *sys.argv])}")
    if "1" in a.only:
        b.s1_overhead()
    if "2" in a.only:
        b.s2_quota_known()
    if "3" in a.only:
        b.s3_quota_unknown()
    if "4" in a.only:
        b.s4_tokens()
    if a.only & {"5", "6", "7"}:
        b.s5_to_s7()
    if "8" in a.only:
        b.s8_batch()
    if "9" in a.only:
        b.s9_merge()
    if "10" in a.only:
        b.s10_structured()
    if "11" in a.only:
        b.s11_parquet()
    if "12" in a.only:
        b.s12_ledger()
    took = time.monotonic() - t0
    table = b.table()
    cmd = cmdline(["python3", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]])
    print(f"\n## Results ({took:.0f} s)\n\n{table}")
    with open(a.results, "w") as f:
        f.write(f"# promptmill benchmark results\n\nCommand (from the repository root): `{cmd}`  \n"
                f"Machine: {os.cpu_count()} CPUs, server and client together; total {took:.0f} s; "
                f"{time.strftime('%Y-%m-%d %H:%M')}.\n\n{table}\n")
    print(f"\n(written to {a.results})")
    return 0 if all(r[3] for r in b.results) else 1


if __name__ == "__main__":
    sys.exit(main())
