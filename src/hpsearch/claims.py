"""Claims: "exactly one process does this" as one atomic create in the study's storage.

Two things in hpsearch must happen once however many processes try at the same instant:
- the study's fingerprint is set by the first worker (`study.open_study`): a worker with another
  study file must be refused, not write its own fingerprint beside the first (and likewise the
  data split's fingerprint, `study.check_split`);
- the test split is read once (`finalize`): two `hpsearch finalize` runs must never both read it.

A read-then-write of a study attribute cannot promise either (both read "nothing yet", both
write). Creating a study can: study names are unique in every Optuna storage, and
`create_new_study` lets one creator through and raises `DuplicatedStudyError` for the others, in
SQLite, PostgreSQL and through the gRPC proxy alike, on Optuna's public storage API. So a claim
is a small marker study named `hpsearch:claim:<study id>:<kind>:<number>:<study name>`, its data
in the marker's user attribute `claim`. (`hpsearch status` leaves the markers out of its list of
studies; optuna-dashboard shows them as studies without trials.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.study import StudyDirection

PREFIX = "hpsearch:claim:"
FINGERPRINT = "fingerprint"
SPLIT = "split"
TEST_SPLIT = "test_split"
ATTR = "claim"
# The claimant writes the data just after the marker exists; a reader waits this long for it.
DATA_WAIT_S = 10.0


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
    def of(storage: BaseStorage, study_name: str) -> "StudyKey":
        return StudyKey(storage.get_study_id_from_name(study_name), study_name)

    def marker(self, kind: str, number: int) -> str:
        return f"{self.prefix(kind)}{number}:{self.study_name}"

    def prefix(self, kind: str) -> str:
        return f"{PREFIX}{self.study_id}:{kind}:"


def is_marker(study_name: str) -> bool:
    return study_name.startswith(PREFIX)


def claim(storage: BaseStorage, key: StudyKey, kind: str, number: int, data: dict[str, Any]) -> bool:
    """Make the claim; True when this call made it, False when another had made it before."""
    try:
        marker = storage.create_new_study([StudyDirection.MINIMIZE], key.marker(kind, number))
    except optuna.exceptions.DuplicatedStudyError:
        return False
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    storage.set_study_user_attr(marker, ATTR, {"claimed_at": now, "data": data})
    return True


def claims(storage: BaseStorage, key: StudyKey, kind: str) -> list[Claim]:
    """Every claim of `kind` for the study, by number (nothing is created by looking)."""
    deadline = time.monotonic() + DATA_WAIT_S
    while True:
        found: list[Claim] = []
        pending = False
        prefix = key.prefix(kind)
        for s in storage.get_all_studies():
            name = s.study_name
            if not name.startswith(prefix) or not name.endswith(f":{key.study_name}"):
                continue
            number = name[len(prefix):].split(":", 1)[0]
            if not number.isdigit():
                continue
            rec = s.user_attrs.get(ATTR)
            pending |= rec is None
            rec = rec or {"claimed_at": "", "data": {}}
            found.append(Claim(int(number), rec["claimed_at"], rec["data"]))
        if not pending or time.monotonic() >= deadline:
            return sorted(found, key=lambda c: c.number)
        time.sleep(0.05)  # a claimant between its create and its data: a moment


def update(storage: BaseStorage, key: StudyKey, kind: str, number: int, data: dict[str, Any]) -> None:
    """Replace the data of a claim this process made (the test figures, once evaluated)."""
    marker = storage.get_study_id_from_name(key.marker(kind, number))
    rec = storage.get_study_user_attrs(marker).get(ATTR) or {}
    storage.set_study_user_attr(marker, ATTR, {"claimed_at": rec.get("claimed_at", ""), "data": data})


def claim_next(storage: BaseStorage, key: StudyKey, kind: str, data: dict[str, Any], *, again: bool,
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
