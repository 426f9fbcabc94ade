//! beckon-agent
