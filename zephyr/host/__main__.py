"""``python -m zephyr.host``: the board emulator (same as ``python -m zephyr.host.emulator``)."""

from zephyr.host.emulator import main

raise SystemExit(main())
