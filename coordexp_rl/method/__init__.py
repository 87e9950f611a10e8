"""The method, pure (docs/METHOD.md): token protocol, coord bins, CoordExp, losses, matching, reordering."""
