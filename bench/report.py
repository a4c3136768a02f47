#!/usr/bin/env python3
"""How long `promptmill report` takes on a large output, and its peak memory.

    python3 bench/report.py                  # 1,000,000 records
    python3 bench/report.py --rows 100000    # another size
    python3 bench/report.py --help

Writes a synthetic output (records shaped like a real run's: an input of two fields, a
~250-character completion, usage, cost, latency, finished_at over ~50 minutes; 0.5% failed,
1% copied) to bench/work/report/, generated once and reused, then times
`promptmill report` on it (release binary) and prints seconds, peak RSS, the report's size
and its table rows. Peak RSS is GNU time's (`/usr/bin/time`, Debian package `time`); without
it, wait4's ru_maxrss, an upper bound (see bench/README.md). Python 3 standard library only.
"""

import argparse
import os
import random
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GNU_TIME = "/usr/bin/time"

WORDS = (
    "compost soil garden balcony worms leaves kitchen scraps carbon nitrogen moisture heat "
    "bin layer turn weeks brown green smell air water small apartment city plants"
).split()
KINDS = [("bad_request", 400, "This model's maximum context length is 128000 tokens."),
         ("server", 500, "The server had an error while processing your request."),
         ("timeout", None, "no answer within 120 s")]


def iso(ms):
    t = time.gmtime(ms // 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + ".%03dZ" % (ms % 1000)


def generate(path, n, seed=7):
    rnd = random.Random(seed)
    start = 1_763_200_000_000
    span = 50 * 60 * 1000
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(1, n + 1):
            topic = " ".join(rnd.choice(WORDS) for _ in range(6))
            inp = '{"id":"p%d","topic":"%s"}' % (i, topic)
            fp = "%032x" % rnd.getrandbits(128)
            at = iso(start + span * i // n + rnd.randrange(1000))
            lat = int(rnd.lognormvariate(6.5, 0.5))
            r = rnd.random()
            if r < 0.005:
                kind, status, msg = rnd.choice(KINDS)
                f.write('{"row":%d,"id":"p%d","status":"error","input":%s,"completion":null,'
                        '"finish_reason":null,"model":null,"usage":null,"cost_usd":null,'
                        '"attempts":%d,"latency_ms":%d,"fingerprint":"%s","error":{"kind":"%s",'
                        '"status":%s,"message":"%s"},"finished_at":"%s"}\n'
                        % (i, i, inp, rnd.randint(1, 7), lat, fp, kind,
                           "null" if status is None else status, msg, at))
                continue
            words = rnd.randint(30, 60)
            completion = " ".join(rnd.choice(WORDS) for _ in range(words)).capitalize() + "."
            p, c = rnd.randint(40, 70), words + rnd.randint(5, 15)
            copied = r > 0.99
            cost = 0 if copied else (p * 0.15 + c * 0.6) / 1e6
            f.write('{"row":%d,"id":"p%d","status":"ok","input":%s,"completion":"%s",'
                    '"finish_reason":"stop","model":"gpt-4o-mini-2024-07-18","usage":%s,'
                    '"cost_usd":%s,"attempts":%d,"latency_ms":%d,"fingerprint":"%s","error":null,'
                    '%s"finished_at":"%s"}\n'
                    % (i, i, inp, completion,
                       "null" if copied else
                       '{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (p, c, p + c),
                       repr(cost), 0 if copied else 1 + (rnd.random() < 0.02), 0 if copied else lat,
                       fp, '"copied_from":{"row":%d,"id":"p%d"},' % (i - 1, i - 1) if copied else "",
                       at))
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="records in the output (default 1,000,000)")
    ap.add_argument("--binary", default=None,
                    help="promptmill binary (default: $CARGO_TARGET_DIR or target/, release)")
    ap.add_argument("--work", default=os.path.join(HERE, "work", "report"), help="where the output goes")
    a = ap.parse_args()

    binary = a.binary or os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                      "release", "promptmill")
    if not os.access(binary, os.X_OK):
        sys.exit(f"no binary at {binary}: cargo build --release --no-default-features")
    os.makedirs(a.work, exist_ok=True)
    out = os.path.join(a.work, f"out-{a.rows}.jsonl")
    if not os.path.exists(out):
        t0 = time.monotonic()
        generate(out, a.rows)
        print(f"generated {out} ({os.path.getsize(out) / 1e6:.0f} MB) in {time.monotonic() - t0:.1f} s")
    html = os.path.join(a.work, f"out-{a.rows}.report.html")
    cmd = [binary, "report", out, "-o", html]
    rss_file = os.path.join(a.work, "rss.txt")
    full = [GNU_TIME, "-f", "%M", "-o", rss_file, *cmd] if os.access(GNU_TIME, os.X_OK) else cmd
    t0 = time.monotonic()
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    err = p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"promptmill report failed ({p.returncode}): {err}")
    if full is not cmd:
        rss_mb, how = int(open(rss_file).read().split()[-1]) / 1024, "GNU time"
    else:
        rss_mb, how = ru.ru_maxrss / 1024, "wait4, an upper bound"
    print(f"$ {shlex.join(cmd)}")
    print(f"  {err.strip()}")
    print(f"records          {a.rows:,}")
    print(f"output           {os.path.getsize(out) / 1e6:.0f} MB")
    print(f"wall             {wall:.2f} s")
    print(f"cpu (user+sys)   {ru.ru_utime + ru.ru_stime:.2f} s")
    print(f"peak RSS         {rss_mb:.1f} MB ({how})")
    print(f"report           {os.path.getsize(html) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
