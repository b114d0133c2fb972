//! Pure drain logic: the objects' relevant fields, the plan, and eviction answers.

pub mod eviction;
pub mod model;
pub mod plan;
