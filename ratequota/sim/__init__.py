"""The simulation behind ``ratequota simulate``: a fleet of pods playing a scenario.

A tool built on the library, not part of it: modules here import
``ratequota``, and nothing in the library imports them. The stable entry
point for the command line is ``add_arguments(parser)`` and ``run(args)``.

* ``scenario`` — policies plus each tenant's traffic, pure and validated;
* ``fleet`` — the pods and worker threads that play a scenario and record what happened;
* ``stats`` — every statistic, computed afterwards from the records;
* ``measure`` — entitlement from real demand, and every gap split into causes;
* ``report`` — the report as text and as JSON;
* ``picture`` — units held per tenant over time (matplotlib);
* ``command`` — the options and the command itself.
"""

from ratequota.sim.command import add_arguments, run

__all__ = ["add_arguments", "run"]
