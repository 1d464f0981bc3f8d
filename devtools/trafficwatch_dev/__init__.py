"""TrafficWatch's development tools (`trafficwatch-dev`): the local feed imitating the Rennes API, its traffic
simulator and the demo's simulated history. They import the pipeline (`trafficwatch`); the pipeline never
imports them (`trafficwatch service start feed|history` runs this package's command), and its image has none.
"""
