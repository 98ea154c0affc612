"""audit trail: one lean row per AuditEvent, moved out of the store's tables

Tables defined in ``sharedcare/audit/schema.py``. AuditEvents already in the store (written
by earlier versions) are moved across, keeping their ids, and their store rows (current
version, versions, search-index rows) are deleted; ``change_log`` keeps its history.

Downgrade drops the new tables only while they are empty: export and prune the trail first
(``sharedcare audit export`` / ``prune``), since the earlier schema cannot take it back.

Revision ID: 0006_audit_trail
Revises: 0005_messaging
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

revision = '0006_audit_trail'
down_revision = '0005_messaging'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_CHUNK = 1000


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('seq', BigId, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('recorded', sa.DateTime(), nullable=False),
    sa.Column('patient', sa.String(length=64), nullable=True),
    sa.Column('user_id', sa.String(length=128), nullable=True),
    sa.Column('organization', sa.String(length=64), nullable=True),
    sa.Column('client_id', sa.String(length=64), nullable=True),
    sa.Column('subtype', sa.String(length=32), nullable=True),
    sa.Column('action', sa.String(length=1), nullable=False),
    sa.Column('outcome', sa.String(length=2), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=True),
    sa.Column('agent_name', sa.String(length=200), nullable=True),
    sa.Column('agent_role', sa.String(length=64), nullable=True),
    sa.Column('agent', sa.String(length=128), nullable=True),
    sa.Column('entity', sa.String(length=256), nullable=True),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_audit_events')),
    sa.UniqueConstraint('id', name=op.f('uq_audit_events_id'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_events_recorded', ['recorded', 'seq'], unique=False)
        batch_op.create_index('ix_audit_events_patient', ['patient', 'recorded'], unique=False)
        batch_op.create_index('ix_audit_events_user_id', ['user_id', 'recorded'], unique=False)
        batch_op.create_index('ix_audit_events_organization', ['organization', 'recorded'], unique=False)
    op.create_table('audit_event_patients',
    sa.Column('patient', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('patient', 'event_id', name=op.f('pk_audit_event_patients'))
    )
    _move_store_events()


def _move_store_events() -> None:
    from sharedcare.audit.columns import event_row
    from sharedcare.audit.schema import audit_event_patients, audit_events

    conn = op.get_bind()
    resources = sa.table(
        'resources', sa.column('rid'), sa.column('type'), sa.column('id'), sa.column('deleted'),
        sa.column('last_updated', sa.DateTime), sa.column('body', sa.LargeBinary),
    )
    last = 0
    while True:
        rows = conn.execute(
            sa.select(
                resources.c.rid, resources.c.id, resources.c.deleted, resources.c.last_updated,
                resources.c.body,
            )
            .where(resources.c.type == 'AuditEvent', resources.c.rid > last)
            .order_by(resources.c.rid)
            .limit(_CHUNK)
        ).all()
        if not rows:
            break
        last = rows[-1].rid
        events = [_row(event_row, r) for r in rows if not r.deleted]
        if events:
            conn.execute(audit_events.insert(), [
                {c.name: getattr(e, c.name) for c in audit_events.columns if c.name != 'seq'} for e in events
            ])
            people = [{'patient': p, 'event_id': e.id} for e in events for p in e.other_patients]
            if people:
                conn.execute(audit_event_patients.insert(), people)
    stale = sa.select(resources.c.rid).where(resources.c.type == 'AuditEvent').scalar_subquery()
    for name in ('idx_token', 'idx_string', 'idx_reference', 'idx_date', 'idx_uri', 'resource_versions'):
        table = sa.table(name, sa.column('rid'))
        conn.execute(sa.delete(table).where(table.c.rid.in_(stale)))
    conn.execute(sa.delete(resources).where(resources.c.type == 'AuditEvent'))


def _row(event_row: Any, stored: Any) -> Any:
    event = orjson.loads(bytes(stored.body))
    try:
        return event_row(event, stored.id)
    except ValueError:  # no usable instant in recorded: keep the event, dated by its write
        event['recorded'] = stored.last_updated.isoformat(timespec='milliseconds') + 'Z'
        return event_row(event, stored.id)


def downgrade() -> None:
    conn = op.get_bind()
    held = conn.execute(sa.text('SELECT count(*) FROM audit_events')).scalar_one()
    if held:
        raise RuntimeError(
            f"audit_events holds {held} AuditEvents, which the earlier schema cannot take back: "
            "export them (`sharedcare audit export`) and prune them (`sharedcare audit prune`) first."
        )
    op.drop_table('audit_event_patients')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_organization')
        batch_op.drop_index('ix_audit_events_user_id')
        batch_op.drop_index('ix_audit_events_patient')
        batch_op.drop_index('ix_audit_events_recorded')
    op.drop_table('audit_events')
