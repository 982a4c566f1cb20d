import Testing

/// The suites that start processes (nats-server, evd, evforward) run one at a time: in parallel
/// they compete for the machine's two cores, and a port one test found free could be taken by
/// another's server in between.
@Suite(.serialized)
struct Processes {}
