"""Looking at what goes in and what comes out: faces and regions drawn over images (the preview) and
how much generated faces look like each identity (the score). Reads encoders/, never feeds the model."""
