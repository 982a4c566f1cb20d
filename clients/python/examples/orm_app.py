#!/usr/bin/env python3
"""A small SQLAlchemy ORM app on evd: the only evd-specific line is the create_engine URL.

    pip install './clients/python[sqlalchemy]'
    python3 orm_app.py [URL]            # URL: evd:///main (default; the socket as every evd client finds it)

It keeps a table of pets: adds three, renames one, then tries to delete one. Watch it with
`evtail insert-rows update-row delete-row` (its writes arrive as those events) and run
`no_deletes.py` beside it: the delete is then refused, and SQLAlchemy raises the veto as an
exception naming the event, the listener and the reason. Prints one line per step.
"""
import sys

from sqlalchemy import String, create_engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class Pet(Base):
    __tablename__ = "pets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(20))


def main(url):
    engine = create_engine(url)                      # was: create_engine("sqlite:///pets.db")
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)

    with Session(engine) as session:
        session.add_all([Pet(name="Rex", kind="dog"), Pet(name="Tom", kind="cat"), Pet(name="Nemo", kind="fish")])
        session.commit()
        print("added", [pet.id for pet in session.scalars(select(Pet).order_by(Pet.id))], flush=True)

        tom = session.scalars(select(Pet).where(Pet.name == "Tom")).one()
        tom.name = "Thomas"
        session.commit()
        print("renamed", tom.id, tom.name, flush=True)

        savepoint = session.begin_nested()           # SAVEPOINT: evd's savepoint op
        session.add(Pet(name="Ghost", kind="none"))
        session.flush()
        savepoint.rollback()                          # back to the savepoint: Ghost never commits
        session.commit()

        session.delete(session.get(Pet, 1))
        try:
            session.commit()
            print("deleted", 1, flush=True)
        except OperationalError as error:
            session.rollback()
            veto = error.orig                         # evd.dbapi.Vetoed: event, by, reason
            print("delete refused:", veto.event, "by", veto.by, "-", veto.reason, flush=True)

        print("pets", [(pet.id, pet.name) for pet in session.scalars(select(Pet).order_by(Pet.id))], flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "evd:///main")
