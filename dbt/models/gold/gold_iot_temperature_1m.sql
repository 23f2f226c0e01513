{#
  Per sensor per minute by the reading's time: temperature and humidity avg/min/max. Incremental like
  gold_user_activity_1m (lookback by event time, windows replaced with delete+insert).
#}
{{ config(alias='iot_temperature_1m', unique_key='window_start') }}

with readings as (
    select * from {{ ref('silver_iot_temperature') }}
    {{ incremental_filter('reading_at', 'window_start', var('gold_lookback_minutes'), cap_at_now=true, grain='minute') }}
)

select
    date_trunc('minute', reading_at) as window_start,
    date_trunc('minute', reading_at) + interval 1 minute as window_end,
    sensor_id,
    count(*) as readings,
    avg(temperature) as avg_temperature,
    min(temperature) as min_temperature,
    max(temperature) as max_temperature,
    avg(humidity) as avg_humidity,
    min(humidity) as min_humidity,
    max(humidity) as max_humidity,
    max(_bronze_version) as bronze_version,
    now() as computed_at
from readings
group by 1, 2, 3
