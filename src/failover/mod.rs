//! Shadows, detection, fencing, promotion.
