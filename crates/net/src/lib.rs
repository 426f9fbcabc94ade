//! beckon-net
