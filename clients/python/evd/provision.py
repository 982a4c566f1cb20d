"""SQLAlchemy's test provisioning for the evd dialect (loaded by sqlalchemy.testing only, through
Dialect.load_provisioning, when its suite runs against evd:// — clients/python/tests/sqla).

SQLite's own (sqlalchemy/dialects/sqlite/provision.py), as a client of a daemon does it: the
schema test_schema is a file ATTACHed on every new connection, by its absolute path (the daemon
opens it, from its own working directory), in the directory of $EVD_TEST_SCHEMA_DIR or else the
working directory; evd keeps a session's attachments for the session. The file is left to whoever
made the directory (scripts/sqlalchemy-suite removes its temporary one)."""

import os

from sqlalchemy import event
from sqlalchemy.testing.provision import post_configure_engine
from sqlalchemy.testing.provision import stop_test_class_outside_fixtures
from sqlalchemy.testing.provision import temp_table_keyword_args
from sqlalchemy.testing.provision import upsert


@post_configure_engine.for_db("evd")
def _evd_post_configure_engine(url, engine, follower_ident):
    directory = os.environ.get("EVD_TEST_SCHEMA_DIR") or os.getcwd()
    name = "%s_evd_test_schema.db" % follower_ident if follower_ident else "evd_test_schema.db"
    path = os.path.abspath(os.path.join(directory, name))

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, connection_record):
        dbapi_connection.execute("ATTACH DATABASE ? AS test_schema", (path,))


@temp_table_keyword_args.for_db("evd")
def _evd_temp_table_keyword_args(cfg, eng):
    return {"prefixes": ["TEMPORARY"]}


@stop_test_class_outside_fixtures.for_db("evd")
def _evd_stop_test_class_outside_fixtures(config, db, cls):
    db.dispose()


@upsert.for_db("evd")
def _evd_upsert(cfg, table, returning, *, set_lambda=None, sort_by_parameter_order=False, index_elements=None):
    from sqlalchemy.dialects.sqlite import insert

    stmt = insert(table)
    if set_lambda:
        stmt = stmt.on_conflict_do_update(set_=set_lambda(stmt.excluded))
    else:
        stmt = stmt.on_conflict_do_nothing()
    return stmt.returning(*returning, sort_by_parameter_order=sort_by_parameter_order)
