"""The registry's tables: tenants, namespaces and API keys; repos, revisions, refs and files; uploaded training files,
fine-tuning jobs and their events. Times are seconds since the epoch; JSON fields are JSON text.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = ("ft_events", "ft_jobs", "uploads", "files", "refs", "revisions", "repos", "api_keys", "namespaces", "tenants")


def upgrade() -> None:
    op.execute("""
CREATE TABLE tenants (name TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE namespaces (
    namespace TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE);
CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '', created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION);
CREATE TABLE repos (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
    private BOOLEAN NOT NULL, created_at DOUBLE PRECISION NOT NULL, UNIQUE (namespace, name));
CREATE TABLE revisions (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, commit_id TEXT NOT NULL UNIQUE,
    repo_id BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE, parent TEXT, message TEXT NOT NULL,
    kind TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE INDEX revisions_repo ON revisions (repo_id, seq);
CREATE TABLE refs (
    repo_id BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE, branch TEXT NOT NULL,
    commit_id TEXT NOT NULL REFERENCES revisions(commit_id) ON DELETE CASCADE, PRIMARY KEY (repo_id, branch));
CREATE TABLE files (
    commit_id TEXT NOT NULL REFERENCES revisions(commit_id) ON DELETE CASCADE, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, size BIGINT NOT NULL, PRIMARY KEY (commit_id, path));
CREATE INDEX files_blob ON files (sha256);
CREATE TABLE uploads (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT NOT NULL UNIQUE, tenant TEXT,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, sha256 TEXT NOT NULL, bytes BIGINT NOT NULL,
    examples BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE INDEX uploads_blob ON uploads (sha256);
CREATE TABLE ft_jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT NOT NULL UNIQUE, tenant TEXT, model TEXT NOT NULL,
    base TEXT, training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, repo_id TEXT NOT NULL,
    settings TEXT NOT NULL, hyperparameters TEXT NOT NULL, seed BIGINT NOT NULL, status TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION,
    fine_tuned_model TEXT, result_commit TEXT, error TEXT, trained_tokens BIGINT, attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL, worker TEXT, lease_expires_at DOUBLE PRECISION);
CREATE INDEX ft_jobs_status ON ft_jobs (status, seq);
CREATE INDEX ft_jobs_tenant ON ft_jobs (tenant, seq);
CREATE TABLE ft_events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL REFERENCES ft_jobs(id) ON DELETE CASCADE, created_at DOUBLE PRECISION NOT NULL,
    level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
CREATE INDEX ft_events_job ON ft_events (job_id, seq);
""")


def downgrade() -> None:
    op.execute(f"DROP TABLE {', '.join(TABLES)}")
