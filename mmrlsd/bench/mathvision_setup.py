"""Install MATH-V's pinned equality environment: ``python -m mmrlsd.bench.mathvision_setup [--site DIR]``.

latex2sympy2 1.9.1 + antlr4-python3-runtime 4.7.2 (+ sympy 1.14.0, mpmath 1.3.0) go into a private directory
with ``pip install --no-deps --target``; only the MATH-V scorer's worker process reads it (see
`mmrlsd.bench._mathv_equal`), so the core install keeps math-verify's newer antlr4.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmrlsd.bench import _mathv_equal as eq


def main(argv: list[str] | None = None) -> int:
    """Install (or with --check, only report) the private site, then ask the worker one question."""
    parser = argparse.ArgumentParser(
        prog="python -m mmrlsd.bench.mathvision_setup",
        description=f"Install MATH-V's pinned equality environment ({', '.join(eq.PINNED)}) into a private "
        "directory that only the scorer's worker process puts on its sys.path.",
        epilog="examples:\n  python -m mmrlsd.bench.mathvision_setup\n"
        "  python -m mmrlsd.bench.mathvision_setup --site /tmp/mathv-site   # then export "
        f"{eq.SITE_ENV}=/tmp/mathv-site\n  python -m mmrlsd.bench.mathvision_setup --check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--site", type=Path, default=None, help=f"directory (default: ${eq.SITE_ENV} or the cache)"
    )
    parser.add_argument("--check", action="store_true", help="only report whether the site is ready")
    args = parser.parse_args(argv)
    site = args.site or eq.default_site()
    if args.check:
        print(f"{site}: {'ready' if eq.site_ready(site) else 'missing'}")
        return 0 if eq.site_ready(site) else 1
    eq.install_site(site, quiet=False)
    with eq.EqualityWorker(site) as worker:
        ok = worker.run([[("\\frac{4}{3}", "1.333")]])[0][0]
    print(f"{site}: ready {worker.versions}; check 4/3 == 1.333 at 2 decimals: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
