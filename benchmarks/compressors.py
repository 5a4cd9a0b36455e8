"""General-purpose compressors on the default run's held-out split, in bits/byte.

  python benchmarks/compressors.py

The held-out documents of ``experiments/lm_tiny.py``'s corpus (the running
Python's standard library, split by ``gemkit.data.in_heldout``), each document
compressed on its own: bits/byte = 8 x (sum of compressed sizes) / (sum of raw
sizes). The figure to set beside the model's held-out bits/byte in the README.
Prints a table and writes ``results/compressors_<machine>.json``.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gemkit import data as data_lib  # noqa: E402
from experiments import lm_tiny  # noqa: E402

COMPRESSORS = {
    "gzip -9": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
    "bz2 -9": lambda b: bz2.compress(b, compresslevel=9),
    "xz -9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
}


def main() -> None:
  cfg = lm_tiny.get_config().data
  corpus = data_lib.Corpus.from_config(cfg)
  docs = [d for d in data_lib.load_documents(cfg)
          if data_lib.in_heldout(d.name, cfg.heldout_fraction)]
  raw = sum(len(d.data) for d in docs)
  rows = []
  for name, fn in COMPRESSORS.items():
    start = time.perf_counter()
    packed = sum(len(fn(d.data)) for d in docs)
    rows.append({"compressor": name, "compressed_bytes": packed,
                 "bits_per_byte": round(8 * packed / raw, 4),
                 "seconds": round(time.perf_counter() - start, 2)})
  print(f"corpus {cfg.source} {corpus.fingerprint}: {len(docs)} held-out documents, "
        f"{raw:,} bytes, each compressed separately")
  print(f"{'compressor':<10} {'compressed bytes':>17} {'bits/byte':>10}")
  for r in rows:
    print(f"{r['compressor']:<10} {r['compressed_bytes']:>17,} {r['bits_per_byte']:>10.4f}")
  from benchmarks import common  # the machine's name (imports jax)
  out = os.path.join(common.RESULTS, f"compressors_{common.machine()}.json")
  with open(out, "w") as f:
    json.dump({"corpus": cfg.source, "fingerprint": corpus.fingerprint,
               "heldout_docs": len(docs), "heldout_bytes": raw,
               "python": sys.version.split()[0], "rows": rows}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
