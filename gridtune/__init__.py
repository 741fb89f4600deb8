"""gridtune core: the settings object, the sweep config and the errors every entry point shares."""
