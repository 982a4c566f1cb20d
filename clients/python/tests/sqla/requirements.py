"""What the SQLite dialect supports, for sqlalchemy.testing.suite, as third-party dialects declare it.

Each property says what SQLAlchemy's own requirements (test/requirements.py in its source) say for
SQLite, so the same class serves evd (`evd:///main`) and SQLAlchemy's pysqlite on a file
(`sqlite:///...`), the baseline scripts/sqlalchemy-suite compares evd with. Where the two differ,
the property says which and why: evd has savepoints and two-phase transactions, pysqlite has
schemas (ATTACH) and Python functions (REGEXP)."""

from sqlalchemy.testing import exclusions
from sqlalchemy.testing.exclusions import only_if
from sqlalchemy.testing.exclusions import skip_if
from sqlalchemy.testing.requirements import SuiteRequirements


def _pysqlite(config):
    return config.db.dialect.driver == "pysqlite"


def _evd(config):
    return config.db.dialect.driver == "evd"


def _version(at_least):
    return only_if(lambda config: config.db.dialect.server_version_info >= at_least,
                   "SQLite %s or later" % ".".join(map(str, at_least)))


class Requirements(SuiteRequirements):
    # -- what differs between evd and pysqlite ----------------------------------------------------

    @property
    def savepoints(self):
        # pysqlite's legacy transactions begin only before DML (SQLAlchemy skips it on SQLite);
        # evd's dialect runs real transactions and evd's savepoint ops.
        return skip_if(_pysqlite, "pysqlite: SAVEPOINT outside its implicit BEGIN")

    @property
    def two_phase_transactions(self):
        return skip_if(_pysqlite, "SQLite has no two-phase commit; evd builds one")

    @property
    def schemas(self):
        # Both ATTACH a file as test_schema on every new connection (their provisioning); evd keeps
        # a session's attachments for the session.
        return exclusions.open()

    @property
    def regexp_match(self):
        # pysqlite registers a Python regexp() per connection; no Python runs inside evd. Left open
        # so that the count shows it.
        return exclusions.open()

    # -- SQLite's features, as SQLAlchemy's own requirements state them -----------------------------

    @property
    def foreign_keys(self):
        return exclusions.closed()  # SQLite does not enforce them unless asked (PRAGMA foreign_keys)

    @property
    def on_update_cascade(self):
        return exclusions.closed()

    @property
    def non_updating_cascade(self):
        return exclusions.open()

    @property
    def implicitly_named_constraints(self):
        return exclusions.closed()

    @property
    def parens_in_union_contained_select_w_limit_offset(self):
        return exclusions.closed()

    @property
    def parens_in_union_contained_select_wo_limit_offset(self):
        return exclusions.closed()

    @property
    def temporary_tables(self):
        return exclusions.closed()  # a file database (SQLAlchemy skips them for those)

    @property
    def temp_table_reflect_indexes(self):
        return exclusions.closed()

    @property
    def temp_table_reflection(self):
        return exclusions.closed()

    @property
    def temp_table_names(self):
        return exclusions.closed()

    @property
    def has_temp_table(self):
        return exclusions.closed()

    @property
    def temporary_views(self):
        return exclusions.closed()

    @property
    def json_index_supplementary_unicode_element(self):
        return exclusions.closed()

    @property
    def numeric_received_as_decimal_untyped(self):
        return exclusions.closed()

    @property
    def nested_aggregates(self):
        return exclusions.closed()

    @property
    def independent_connections(self):
        return exclusions.closed()  # one writer at a time

    @property
    def create_table_as(self):
        return exclusions.open()

    @property
    def create_temp_table_as(self):
        return exclusions.open()

    @property
    def table_ddl_if_exists(self):
        return exclusions.open()

    @property
    def index_ddl_if_exists(self):
        return exclusions.open()

    @property
    def repeated_column_foreign_keys(self):
        return exclusions.open()

    @property
    def repeated_remote_col_foreign_keys(self):
        return exclusions.open()

    @property
    def boolean_col_expressions(self):
        return exclusions.open()

    @property
    def nullsordering(self):
        return _version((3, 30, 0))

    @property
    def intersect(self):
        return exclusions.open()

    @property
    def except_(self):
        return exclusions.open()

    @property
    def window_functions(self):
        return _version((3, 25, 0))

    @property
    def window_range(self):
        return exclusions.open()

    @property
    def window_range_numeric(self):
        return exclusions.open()

    @property
    def ctes(self):
        return _version((3, 8, 3))

    @property
    def ctes_with_values(self):
        return _version((3, 8, 3))

    @property
    def tuple_in(self):
        return _version((3, 15, 0))

    @property
    def emulated_lastrowid(self):
        return exclusions.open()

    @property
    def emulated_lastrowid_even_with_sequences(self):
        return exclusions.open()

    @property
    def dbapi_lastrowid(self):
        return exclusions.open()

    @property
    def views(self):
        return exclusions.open()

    @property
    def foreign_key_constraint_name_reflection(self):
        return exclusions.open()

    @property
    def reflects_pk_names(self):
        return exclusions.open()

    @property
    def foreign_key_constraint_option_reflection_ondelete(self):
        return exclusions.open()

    @property
    def fk_constraint_option_reflection_ondelete_restrict(self):
        return exclusions.open()

    @property
    def fk_constraint_option_reflection_ondelete_noaction(self):
        return exclusions.open()

    @property
    def foreign_key_constraint_option_reflection_onupdate(self):
        return exclusions.open()

    @property
    def fk_constraint_option_reflection_onupdate_restrict(self):
        return exclusions.open()

    @property
    def indexes_check_column_order(self):
        return exclusions.open()

    @property
    def indexes_with_expressions(self):
        return _version((3, 9, 0))

    @property
    def inline_check_constraint_reflection(self):
        return exclusions.open()

    @property
    def check_constraint_reflection(self):
        return exclusions.open()

    @property
    def unique_constraint_reflection(self):
        return exclusions.open()

    @property
    def nvarchar_types(self):
        return exclusions.open()

    @property
    def unicode_ddl(self):
        return exclusions.open()

    @property
    def datetime_literals(self):
        return exclusions.open()

    @property
    def datetime_historic(self):
        return exclusions.open()

    @property
    def date_historic(self):
        return exclusions.open()

    @property
    def isolation_level(self):
        return exclusions.open()

    @property
    def autocommit(self):
        return exclusions.open()

    @property
    def skip_autocommit_rollback(self):
        return exclusions.open()

    def get_isolation_levels(self, config):
        with config.db.connect() as connection:
            default = connection.dialect.get_isolation_level(connection.connection.dbapi_connection)
        return {"default": default, "supported": ["READ UNCOMMITTED", "SERIALIZABLE", "AUTOCOMMIT"]}

    @property
    def json_type(self):
        return exclusions.open()  # SQLite's JSON1 functions are built in since 3.38

    @property
    def legacy_unconditional_json_extract(self):
        return exclusions.open()

    @property
    def precision_numerics_enotation_small(self):
        return exclusions.open()

    @property
    def precision_numerics_retains_significant_digits(self):
        return exclusions.open()

    @property
    def server_defaults(self):
        return exclusions.open()

    @property
    def expression_server_defaults(self):
        return exclusions.open()

    @property
    def aggregate_order_by(self):
        return _version((3, 44, 0))

    @property
    def infinity_floats(self):
        return exclusions.open()

    @property
    def float_or_double_precision_behaves_generically(self):
        return exclusions.open()

    @property
    def update_from(self):
        return _version((3, 33, 0))

    @property
    def mod_operator_as_percent_sign(self):
        return exclusions.open()

    @property
    def percent_schema_names(self):
        return exclusions.open()

    @property
    def order_by_label_with_expression(self):
        return exclusions.open()

    @property
    def computed_columns(self):
        return _version((3, 31, 0))

    @property
    def computed_columns_stored(self):
        return self.computed_columns

    @property
    def computed_columns_virtual(self):
        return self.computed_columns

    @property
    def computed_columns_reflect_persisted(self):
        return self.computed_columns

    @property
    def fetch_offset_with_options(self):
        return exclusions.open()

    @property
    def fetch_expression(self):
        return exclusions.open()

    @property
    def reflect_table_options(self):
        return exclusions.open()

    @property
    def supports_bitwise_or(self):
        return exclusions.open()

    @property
    def supports_bitwise_and(self):
        return exclusions.open()

    @property
    def supports_bitwise_not(self):
        return exclusions.open()

    @property
    def supports_bitwise_xor(self):
        return exclusions.open()

    @property
    def supports_bitwise_shift(self):
        return exclusions.open()
