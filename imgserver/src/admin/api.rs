//! The admin JSON API under `/api/v1/admin/` (see `docs/admin-api.md`).
