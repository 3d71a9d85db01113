"""graceful's own demo application as a plain twisted.web resource, for ``twistd web``.

``twistd -n web --class demo_resource.DemoTree`` (with this folder on ``PYTHONPATH``) serves
exactly the resource tree ``twistd graceful`` serves by default (``GET /`` and ``GET /bytes/N``,
from ``graceful_plugin.web``), so that ``throughput.py`` compares the two servers and nothing
else: the same resources, the same traversal, the same body producer on both sides.
"""

from graceful_plugin.web import DemoRoot


class DemoTree(DemoRoot):
    """
    The demo application's root; ``GET /`` names generation 0 (twistd web has none).
    """

    def __init__(self) -> None:
        super().__init__(lambda: 0)
