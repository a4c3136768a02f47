"""Azurite's blob API with the emulator's well-known account key (SharedKey signing), for tests:
az.py PORT mkcontainer NAME | put CONTAINER BLOB < data | get CONTAINER BLOB > data | list CONTAINER"""
import base64, hashlib, hmac, sys, urllib.request, urllib.error
from email.utils import formatdate
ACCT = "devstoreaccount1"
KEY = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")

def call(port, method, path, query=(), body=b"", extra=None):
    date = formatdate(usegmt=True)
    h = {"x-ms-date": date, "x-ms-version": "2021-08-06", **(extra or {})}
    canon_h = "".join(f"{k}:{h[k]}\n" for k in sorted(h) if k.startswith("x-ms-"))
    canon_r = f"/{ACCT}/{ACCT}/{path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query))
    length = str(len(body)) if body else ""
    ctype = "application/octet-stream" if method == "PUT" else ""
    to_sign = f"{method}\n\n\n{length}\n\n{ctype}\n\n\n\n\n\n\n" + canon_h + canon_r
    sig = base64.b64encode(hmac.new(KEY, to_sign.encode(), hashlib.sha256).digest()).decode()
    q = "&".join(f"{k}={v}" for k, v in query)
    url = f"http://127.0.0.1:{port}/{ACCT}/{path}" + (f"?{q}" if q else "")
    req = urllib.request.Request(url, method=method, data=body if method == "PUT" else None,
                                 headers={**h, **({"Content-Type": ctype} if ctype else {}), "Authorization": f"SharedKey {ACCT}:{sig}",
                                          "Content-Length": str(len(body))})
    return urllib.request.urlopen(req).read()

port, cmd = sys.argv[1], sys.argv[2]
if cmd == "mkcontainer":
    call(port, "PUT", sys.argv[3], [("restype", "container")])
elif cmd == "put":
    call(port, "PUT", f"{sys.argv[3]}/{sys.argv[4]}", body=sys.stdin.buffer.read(),
         extra={"x-ms-blob-type": "BlockBlob"})
elif cmd == "get":
    try:
        sys.stdout.buffer.write(call(port, "GET", f"{sys.argv[3]}/{sys.argv[4]}"))
    except urllib.error.HTTPError as e:
        sys.exit(3 if e.code == 404 else 1)
elif cmd == "list":
    xml = call(port, "GET", sys.argv[3], [("comp", "list"), ("restype", "container")]).decode()
    for part in xml.split("<Name>")[1:]:
        print(part.split("</Name>")[0])
