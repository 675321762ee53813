"""``comfyui-xdit``: generate a latent, write a tiny model file, inspect the pool.

The entry point imports nothing but the standard library before it knows the host Python can run
us: when torch (or something the commands import) is broken, it prints ``environment.diagnose``'s
one-line message naming the package and the fix, not a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

ENVIRONMENT_EXIT = 4


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        from . import cli_commands
    except Exception:
        from .environment import ENGINE, diagnose

        problem = diagnose((ENGINE,))
        if problem is None:
            raise  # not an environment problem: a bug of ours, keep the traceback
        sys.stderr.write(f"comfyui-xdit: error: {problem}\n")
        return ENVIRONMENT_EXIT
    return cli_commands.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
