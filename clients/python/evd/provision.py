"""SQLAlchemy's test provisioning for the evd dialect (loaded by sqlalchemy.testing only, through
Dialect.load_provisioning, when its suite runs against evd:// — clients/python/tests/sqla).

SQLite's own provisioning (sqlalchemy/dialects/sqlite/provision.py) minus what a client of a daemon
cannot do: it ATTACHes a file per connection for the test_schema schema and deletes database files
itself. evd serves its databases by name and refuses ATTACH, so the suite runs without schemas."""

from sqlalchemy.testing.provision import stop_test_class_outside_fixtures
from sqlalchemy.testing.provision import temp_table_keyword_args
from sqlalchemy.testing.provision import upsert


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
