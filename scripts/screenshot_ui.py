"""Screenshot of `plan2img serve` in headless Chromium (Debian's ``chromium``), the page filled in with its sample
prompt generated and refined (``serve --example``), written to docs/ui.png.

    python scripts/screenshot_ui.py [--out docs/ui.png] [--port 7870] [--wait-ms 60000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from safeio import atomic_write_bytes


def wait_for(url: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the UI did not come up at {url} within {seconds:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/ui.png")
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--size", default="1400,1250", help="window width,height")
    p.add_argument("--wait-ms", type=int, default=5000, help="Chromium's virtual time budget to render the page")
    args = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    url = f"http://127.0.0.1:{args.port}/"
    server = subprocess.Popen([sys.executable, "-m", "plan2img", "serve", "--port", str(args.port), "--example"])
    try:
        wait_for(url, 300)
        with tempfile.TemporaryDirectory() as tmp:
            shot = Path(tmp) / "ui.png"
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--window-size={args.size}", f"--virtual-time-budget={args.wait_ms}",
                            f"--screenshot={shot}", url], check=True, capture_output=True, timeout=300)  # fmt: skip
            atomic_write_bytes(args.out, shot.read_bytes())
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
