"""Face and style encoders: photos -> identity and style objects."""
