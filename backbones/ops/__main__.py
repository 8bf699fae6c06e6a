"""``python -m backbones.ops``: build our CPU depthwise kernels now and check them against ``F.conv2d``.

The same as ``python -m backbones.ops.cpu_depthwise``, without the warning Python gives when a module the package
already imported is run as the main module."""

from .cpu_depthwise import main

raise SystemExit(main())
