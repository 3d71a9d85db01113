from twisted.application.service import ServiceMaker

import graceful_plugin  # noqa: F401 (a successor's start-up goes idle at this first import)

graceful = ServiceMaker(
    "graceful",
    "graceful_plugin.tap",
    "Serve with zero-downtime restarts: hand listening sockets to a successor process.",
    "graceful",
)
