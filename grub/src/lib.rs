//! Boot configuration.
//!
//! This crate will hold the reading and rewriting of the device's GRUB configuration that
//! autogenic imaging needs (MISSION.md §3): switching the next boot into the imaging engine
//! (the seed's `Grub_merlin` → `/Grub/Grub.config` copy), writing the imaging status after a
//! re-image, and removing it once the agent has reported it to the server. Nothing lives here
//! yet; the imaging engine and the agent do not depend on it.
