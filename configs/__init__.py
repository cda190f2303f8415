"""Run configs (YAML) and open_clip model configs (clip/*.json) shipped with caer."""
