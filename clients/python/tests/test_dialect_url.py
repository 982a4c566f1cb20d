"""evd:/// URLs become evd.dbapi.connect's arguments (no daemon needed).

    python -m pytest clients/python/tests/test_dialect_url.py
"""
import unittest

from sqlalchemy import exc
from sqlalchemy.engine import make_url

from evd.dialect import EvdDialect


class DialectURLTest(unittest.TestCase):
    def connect_args(self, url):
        args, kwargs = EvdDialect().create_connect_args(make_url(url))
        self.assertEqual(args, [])
        return kwargs

    def test_every_argument_reaches_the_driver(self):
        kwargs = self.connect_args("evd:///main?socket=/run/evd/evd.sock&token=evd_abc&timeout=2.5&socket_timeout=10")
        self.assertEqual(kwargs, {"database": "main", "autocommit": False, "socket": "/run/evd/evd.sock",
                                  "token": "evd_abc", "timeout": 2.5, "socket_timeout": 10.0})

    def test_no_arguments(self):
        self.assertEqual(self.connect_args("evd:///main"), {"database": "main", "autocommit": False})
        self.assertEqual(self.connect_args("evd://"), {"database": None, "autocommit": False})

    def test_unknown_argument_and_host_are_refused(self):
        with self.assertRaises(exc.ArgumentError):
            self.connect_args("evd:///main?sock=/tmp/x")
        with self.assertRaises(exc.ArgumentError):
            self.connect_args("evd://host/main")


if __name__ == "__main__":
    unittest.main()
