"""``python -m workbench.models prepare-demo``: build the demo model's safetensors copy ahead of time."""

from workbench.models.demo import main

raise SystemExit(main())
