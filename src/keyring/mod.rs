//! keyrings
