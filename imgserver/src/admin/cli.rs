//! `imgserver admin ...` and the administrator's changing commands through the admin core.
