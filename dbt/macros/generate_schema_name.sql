{# Models land in the schema they configure (silver, gold), not "<target schema>_<schema>". #}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {{ (custom_schema_name or target.schema) | trim }}
{%- endmacro %}
