"""The one way in: each step script (scripts/<step>.py) calls one function here, which takes paths
and values (never the snakemake object) and calls the layers below."""
