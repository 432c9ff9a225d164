//! Bridge and route rewiring over rtnetlink.
