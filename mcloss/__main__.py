"""``python -m mcloss`` is the ``mcloss`` command."""

from .cli import main

raise SystemExit(main())
