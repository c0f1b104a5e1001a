"""Which S3 client the object-storage source uses: a small measurement of the candidates.

For each of boto3, obstore and s3fs: the import cost in a fresh interpreter (``python -X importtime``'s
cumulative microseconds of the top-level import), and the throughput of ranged GETs of a ~200 MB object
from moto's S3 server on loopback (the object read as 8 MiB ranges, 4 in flight, best of 3). The figures
and the choice are in ``docs/BENCHMARKS.md`` ("S3 client"). Runs on one machine; needs ``moto[server]``,
``boto3``, ``obstore`` and ``s3fs``. ``python -m benchmarks.s3_clients [--mib 200]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BUCKET, KEY = "bench", "blob.bin"
PIECE = 8 << 20  # 0: the whole object in one request
IN_FLIGHT = 4


def import_cost_ms(module: str) -> float:
    """Cumulative import time of ``module`` in a fresh interpreter, in milliseconds (median of 3)."""
    runs = []
    for _ in range(3):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                             text=True, check=True).stderr
        line = [ln for ln in err.splitlines() if re.search(rf"\|\s*{re.escape(module)}$", ln)][-1]
        runs.append(int(line.split("|")[1]) / 1000)
    return sorted(runs)[1]


def _ranges(size: int) -> list[tuple[int, int]]:
    return [(a, min(a + PIECE, size)) for a in range(0, size, PIECE)] if PIECE else [(0, size)]


def read_boto3(endpoint: str, size: int) -> int:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(max_pool_connections=IN_FLIGHT))

    def get(r):
        return len(client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={r[0]}-{r[1] - 1}")["Body"].read())

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        return sum(pool.map(get, _ranges(size)))


def read_obstore(endpoint: str, size: int) -> int:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, region="us-east-1", client_options={"allow_http": True})

    def get(r):  # one request per range (``get_ranges`` would coalesce adjacent ranges into one request)
        return len(obstore.get_range(store, KEY, start=r[0], end=r[1]))

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        return sum(pool.map(get, _ranges(size)))


def read_s3fs(endpoint: str, size: int) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})

    def get(r):
        return len(fs.cat_file(f"{BUCKET}/{KEY}", start=r[0], end=r[1]) if hasattr(fs, "cat_file")
                   else fs.read_block(f"{BUCKET}/{KEY}", r[0], r[1] - r[0]))

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        return sum(pool.map(get, _ranges(size)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        size = args.mib << 20
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=KEY, Body=os.urandom(size))
        global PIECE
        for name, module, read in (("boto3", "boto3", read_boto3), ("obstore", "obstore", read_obstore),
                                   ("s3fs", "s3fs", read_s3fs)):
            rates = []
            for PIECE in (8 << 20, 0):
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    got = read(endpoint, size)
                    times.append(time.perf_counter() - t0)
                    assert got == size, (name, got, size)
                rates.append(size / min(times) / 1e6)
            print(f"{name:8s} import {import_cost_ms(module):7.1f} ms   {args.mib} MiB as 8 MiB ranges, {IN_FLIGHT} in "
                  f"flight: {rates[0]:6.1f} MB/s   as one GET: {rates[1]:6.1f} MB/s (best of 3)", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
