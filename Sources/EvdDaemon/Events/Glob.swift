import EvdClient

/// The catalog name closest to `name` (for `unknown_event`'s suggestion), if any is close.
public func closestEventName(to name: String) -> String? {
    var best: (String, Int)? = nil
    for kind in EventKind.allCases {
        let distance = editDistance(name, kind.name)
        if distance <= max(2, name.count / 3), best == nil || distance < best!.1 { best = (kind.name, distance) }
    }
    return best?.0
}

private func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a.utf8)
    let b = Array(b.utf8)
    var previous = Array(0...b.count)
    for i in 1...max(a.count, 1) where !a.isEmpty {
        var current = [i] + Array(repeating: 0, count: b.count)
        for j in stride(from: 1, through: b.count, by: 1) {
            let cost = a[i - 1] == b[j - 1] ? 0 : 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
        }
        previous = current
    }
    return a.isEmpty ? b.count : previous[b.count]
}
