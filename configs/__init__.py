"""Named configs (``--config demo_cpu``): this folder ships inside the wheel as ``lung_effnet.configs``."""
