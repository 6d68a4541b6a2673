"""Pipeline parallelism: schedules are data (schedules.py, pipedream.py), proven sound in one
process (simulate.py), executed by one engine (engine.py) on stages (stage.py), built per rank
from the rank map (plan.py) and recorded on request (timeline.py)."""
