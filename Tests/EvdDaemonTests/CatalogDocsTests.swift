import Foundation
import Testing

@testable import EvdDaemon

/// docs/events.md and the catalog in code must say the same: a test, so neither drifts.
@Suite("Catalog and docs/events.md")
struct CatalogDocsTests {
    struct DocumentedEvent: Equatable, CustomStringConvertible {
        var name: String
        var family: String
        var vetoable: Bool
        var mutable: [String]
        var properties: [String]
        var description: String { "\(name) (\(family)) vetoable=\(vetoable) mutable=\(mutable) properties=\(properties)" }
    }

    /// The rows of docs/events.md's tables: `| \`name\` | yes/no | mutable | properties | when |`.
    static func documentedEvents() throws -> [DocumentedEvent] {
        let text = try String(contentsOfFile: repositoryRoot + "/docs/events.md", encoding: .utf8)
        var family = ""
        var events: [DocumentedEvent] = []
        func names(_ cell: String) -> [String] {
            cell.split(separator: ",").map {
                $0.trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "`"))
            }
            .filter { !$0.isEmpty && $0 != "–" }
        }
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("## ") {
                family = line.dropFirst(3).split(separator: " ").first.map { $0.lowercased() } ?? ""
                if family == "ddl" { family = "ddl" }
                continue
            }
            guard line.hasPrefix("| `") else { continue }
            let cells = line.split(separator: "|", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
            // ["", name, vetoable, mutable, properties, when, ""]
            guard cells.count >= 6 else { continue }
            events.append(
                DocumentedEvent(
                    name: cells[1].trimmingCharacters(in: CharacterSet(charactersIn: "`")),
                    family: family,
                    vetoable: cells[2] == "yes",
                    mutable: names(cells[3]),
                    properties: names(cells[4])
                )
            )
        }
        return events
    }

    @Test("every catalog event is documented with the same family, flags and properties, and nothing else is")
    func docsMatchCatalog() throws {
        let documented = try Self.documentedEvents()
        let catalog = EventKind.allCases.map { kind in
            DocumentedEvent(
                name: kind.name,
                family: kind.spec.family.rawValue,
                vetoable: kind.spec.vetoable,
                mutable: kind.spec.mutable,
                properties: kind.spec.properties.map(\.0)
            )
        }
        #expect(documented.count == catalog.count)
        for event in catalog {
            let doc = documented.first { $0.name == event.name }
            #expect(doc == event, "docs/events.md disagrees with the catalog about \(event.name)")
        }
        for doc in documented where !catalog.contains(where: { $0.name == doc.name }) {
            Issue.record("docs/events.md lists \(doc.name), which is not in the catalog")
        }
    }

    @Test("the catalog has every event PROTOCOL.md section 6 names, each once")
    func catalogIsComplete() {
        let names = EventKind.allCases.map(\.name)
        #expect(Set(names).count == names.count)
        let pool = [
            "connect", "first_connect", "checkout", "checkin", "reset", "invalidate", "soft_invalidate", "close", "detach",
            "close_detached",
        ]
        let connection = [
            "engine_connect", "before_execute", "after_execute", "before_cursor_execute", "after_cursor_execute", "begin",
            "commit", "rollback", "savepoint", "release_savepoint", "rollback_savepoint", "begin_twophase",
            "prepare_twophase", "commit_twophase", "rollback_twophase", "handle_error", "dbapi_error", "engine_disposed",
            "set_connection_execution_options", "set_engine_execution_options",
        ]
        let dialect = ["do_connect", "do_execute", "do_execute_no_params", "do_executemany"]
        let ddl = [
            "before_create", "after_create", "before_drop", "after_drop", "before_parent_attach", "after_parent_attach", "column_reflect",
        ]
        let datasette = [
            "login", "logout", "create-token", "create-table", "drop-table", "alter-table", "insert-rows", "upsert-rows",
            "update-row", "delete-row", "rename-table",
        ]
        #expect(Set(names) == Set(pool + connection + dialect + ddl + datasette))
        let vetoable = Set(EventKind.allCases.filter { $0.spec.vetoable }.map(\.name))
        #expect(
            vetoable == [
                "checkout", "before_execute", "before_cursor_execute", "begin", "commit", "savepoint", "handle_error",
                "do_connect", "do_execute", "do_execute_no_params", "do_executemany", "before_create", "before_drop",
                "before_parent_attach", "column_reflect",
            ]
        )
        #expect(EventKind(name: "before_cursor_execute")?.spec.mutable == ["statement", "parameters"])
        #expect(EventKind(name: "handle_error")?.spec.mutable == ["error"])
        #expect(EventKind(name: "do_connect")?.spec.mutable == ["pragmas"])
        #expect(EventKind(name: "column_reflect")?.spec.mutable == ["column"])
        #expect(EventKind(name: "before_execute")?.spec.mutable == ["request"])
    }
}
