from twisted.application.service import ServiceMaker

graceful = ServiceMaker(
    "graceful",
    "graceful_plugin.tap",
    "Serve with zero-downtime restarts: hand listening sockets to a successor process.",
    "graceful",
)
