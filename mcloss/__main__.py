"""``python -m mcloss`` is the ``mcloss`` command."""

from .cli import main

__all__: list[str] = []

raise SystemExit(main())
