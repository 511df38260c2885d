"""Claims: "exactly one process does this" as one row with a unique key in the study's database.

Two things in hpsearch must happen once however many processes try at the same instant:
- the study's fingerprint is set by the first worker (`study.open_study`): a worker with another
  study file must be refused, not write its own fingerprint beside the first (and likewise the
  data split's fingerprint, `study.check_split`);
- the test split is read once (`finalize`): two `hpsearch finalize` runs must never both read it.

A read-then-write of a study attribute cannot promise either (both read "nothing yet", both
write). An INSERT into a table whose primary key is (study, kind, number) can: the database lets
one INSERT through and refuses the other with an integrity error, in SQLite and PostgreSQL alike.
The table (`hpsearch_claims`, SQLAlchemy Core) sits beside Optuna's and is created by the first
process that claims anything; readers never create it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc
from optuna.storages import RDBStorage

from hpsearch.errors import StorageError
from hpsearch.storage import redact

_metadata = sa.MetaData()
TABLE = sa.Table(
    "hpsearch_claims",
    _metadata,
    sa.Column("study_id", sa.Integer, nullable=False),
    sa.Column("study_name", sa.String(512), nullable=False),  # Optuna's limit for study names
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("claimed_at", sa.String(40), nullable=False),
    sa.Column("data", sa.Text, nullable=False),  # JSON
    # The whole point: one row per (study, kind, number), whoever inserts it.
    sa.PrimaryKeyConstraint("study_id", "study_name", "kind", "number", name="hpsearch_claims_pk"),
)

FINGERPRINT = "fingerprint"
SPLIT = "split"
TEST_SPLIT = "test_split"


@dataclass(frozen=True)
class Claim:
    number: int
    claimed_at: str
    data: dict[str, Any]


@dataclass(frozen=True)
class StudyKey:
    """A study as the claims know it: Optuna's id and name (the name alone survives a deleted and
    re-created study; the pair does not, unless the database reuses the id)."""

    study_id: int
    study_name: str

    @staticmethod
    def of(storage: RDBStorage, study_name: str) -> "StudyKey":
        return StudyKey(storage.get_study_id_from_name(study_name), study_name)


def _fail(storage: RDBStorage, e: Exception) -> StorageError:
    first = (str(getattr(e, "orig", e)).strip().splitlines() or [type(e).__name__])[0]
    return StorageError(f"storage {redact(str(storage.engine.url))}: cannot record a claim ({first})")


def _ensure_table(storage: RDBStorage) -> None:
    """Create the table if missing. Two processes may both find it missing: the loser's CREATE
    fails ("already exists", or PostgreSQL's duplicate type name), and the table is there."""
    try:
        TABLE.create(storage.engine, checkfirst=True)
    except sqlalchemy.exc.SQLAlchemyError as e:
        if not sa.inspect(storage.engine).has_table(TABLE.name):
            raise _fail(storage, e) from None


def claim(storage: RDBStorage, key: StudyKey, kind: str, number: int, data: dict[str, Any]) -> bool:
    """Insert the claim; True when this call made it, False when another had made it before."""
    _ensure_table(storage)
    row = dict(study_id=key.study_id, study_name=key.study_name, kind=kind, number=number,
               claimed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               data=json.dumps(data, sort_keys=True))
    try:
        with storage.engine.begin() as con:
            con.execute(TABLE.insert().values(**row))
    except sqlalchemy.exc.IntegrityError:
        return False
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise _fail(storage, e) from None
    return True


def claims(storage: RDBStorage, key: StudyKey, kind: str) -> list[Claim]:
    """Every claim of `kind` for the study, by number; none (and nothing created) without a table."""
    try:
        if not sa.inspect(storage.engine).has_table(TABLE.name):
            return []
        query = (
            sa.select(TABLE.c.number, TABLE.c.claimed_at, TABLE.c.data)
            .where(TABLE.c.study_id == key.study_id, TABLE.c.study_name == key.study_name,
                   TABLE.c.kind == kind)
            .order_by(TABLE.c.number)
        )
        with storage.engine.connect() as con:
            rows = con.execute(query).all()
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise _fail(storage, e) from None
    return [Claim(n, at, json.loads(data)) for n, at, data in rows]


def update(storage: RDBStorage, key: StudyKey, kind: str, number: int, data: dict[str, Any]) -> None:
    """Replace the data of a claim this process made (the test figures, once evaluated)."""
    statement = (
        TABLE.update()
        .where(TABLE.c.study_id == key.study_id, TABLE.c.study_name == key.study_name,
               TABLE.c.kind == kind, TABLE.c.number == number)
        .values(data=json.dumps(data, sort_keys=True))
    )
    try:
        with storage.engine.begin() as con:
            con.execute(statement)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise _fail(storage, e) from None


def claim_next(storage: RDBStorage, key: StudyKey, kind: str, data: dict[str, Any], *, again: bool,
               after: int = 0) -> int | None:
    """Claim the next number of `kind` (above every claim and above `after`), writing it into
    `data["n"]`. Without `again` only the first may be claimed: None when another process holds
    it. With `again`, a number taken meanwhile by another process moves this one to the next."""
    while True:
        taken = claims(storage, key, kind)
        number = max([c.number for c in taken] + [after]) + 1
        if number > 1 and not again:
            return None
        data["n"] = number
        if claim(storage, key, kind, number, data):
            return number
        if not again:
            return None
