// No tests needed for utils.rs at this time
