"""Active inheritance: select, fine-tune, profile, compare and the `inherit` pipeline."""
