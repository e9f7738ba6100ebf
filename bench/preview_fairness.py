"""How long a visitor's bundled-data preview waits while another visitor previews a big upload of tiny rows.

    .venv/bin/python bench/preview_fairness.py [MB]      (default 20 MB: about 2.3 million two-column rows)

Serves the real app on loopback; prints the seconds of the big upload's preview (its upload included) and of the
bundled preview sent while it runs, and the bundled preview alone. A measurement, not a test (docs/reliability.md).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gradio_client import Client, handle_file  # noqa: E402

from helpers import served_app  # noqa: E402


def main(megabytes: float) -> None:
    with tempfile.TemporaryDirectory() as folder:
        big = Path(folder) / "tiny-rows.csv"
        with big.open("w", encoding="utf-8") as out:
            out.write("prompt,completion\n")
            i = 0
            while out.tell() < megabytes * 2**20:
                out.write("".join(f"q{n},a{n}\n" for n in range(i, i + 10_000)))
                i += 10_000
        with served_app(Path(folder) / "runs") as url:
            uploader, other = Client(url, verbose=False), Client(url, verbose=False)
            began = time.monotonic()
            alone = other.predict(data_kind="Bundled", data_file=None, api_name="/preview_data")
            alone_s = time.monotonic() - began
            began = time.monotonic()
            job = uploader.submit(data_kind="Uploaded file", data_file=handle_file(str(big)), api_name="/preview_data")
            bundled = other.predict(data_kind="Bundled", data_file=None, api_name="/preview_data")
            bundled_s = time.monotonic() - began
            text, _ = job.result()
            big_s = time.monotonic() - began
        print(f"file: {big.stat().st_size / 2**20:.1f} MB, {i:,} rows")
        print(f"bundled preview alone: {alone_s:.2f} s; while the big preview runs: {bundled_s:.2f} s")
        print(f"big upload's preview (upload included): {big_s:.2f} s")
        print(text.split("**Rows:**")[1].split("→")[0].strip() if "**Rows:**" in text else text[:300])
        assert "in the source" in bundled[0] and "in the source" in alone[0]


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0)
