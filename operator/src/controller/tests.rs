//! Reconcile tests.
